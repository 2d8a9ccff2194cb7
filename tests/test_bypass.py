"""Res-Tuning-Bypass (rules/res_tuning_bypass.yaml): the side ladder on ViT, Swin, ConvNeXt, ResNet and
a transformers encoder. Identity at init, the formula against a float64 eager reference built from the
model's own blocks, no backbone operation recorded for backward, the match estimate, training, the zoo
chain (train step, fold keeps it, ONNX Runtime parity away from identity) and the refusals."""

from __future__ import annotations

import operator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import utune_fx  # noqa: F401  (before timm)
from utune_fx.errors import UtuneError
from utune_fx.fold import KEPT, fold
from utune_fx.match import MatchContext, load_rules
from utune_fx.match.report import match_report
from utune_fx.rewrite import rewrite
from utune_fx.rewrite.attention_sites import TUNER_META
from utune_fx.rewrite.bypass import chain_sizes
from utune_fx.rewrite.plan import site_refusal
from utune_fx.trace import trace
from utune_fx.trace.annotate import set_training
from utune_fx.tuners.bypass import BypassJoin, BypassStep
from utune_fx.zoo.stages import run_module_chain

RULES = Path(__file__).resolve().parents[1] / "rules" / "res_tuning_bypass.yaml"


def _timm(name: str, size: int, **options):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **options).eval(), torch.randn(2, 3, size, size)


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval(), torch.randint(0, 100, (2, 12))


MODELS = {
    "vit": lambda: _timm("vit_tiny_patch16_224", 32, img_size=32, patch_size=8, depth=3),
    "swin": lambda: _timm(
        "swin_tiny_patch4_window7_224", 56, img_size=56, embed_dim=24, depths=(1, 1), num_heads=(1, 2)
    ),
    "convnext": lambda: _timm("convnext_atto", 64, depths=(1, 1, 1, 1)),
    "resnet": lambda: _timm("resnet10t", 32),
    "bert": _bert,
}
STEMS = {"vit": 3, "swin": 2, "convnext": 4, "resnet": 4, "bert": 3}  # blocks, from the configs


def _tuned(arch: str):
    model, x = MODELS[arch]()
    gm = trace(model, (x,))
    result = rewrite(gm, load_rules(RULES))
    return model, x, result


def _away_from_identity(module: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("utune."):
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_match_estimates_exactly_the_parameters_the_rewrite_adds(arch):
    model, x, result = _tuned(arch)
    gm = trace(model, (x,))
    rules = load_rules(RULES)
    report = match_report(gm, model, rules, "", site_refusal, MatchContext(gm), chained=chain_sizes)
    estimated = {entry["rule"]: entry["added_parameters"] for entry in report["results"]}
    added = {summary.rule: summary.added_parameters for summary in result.summaries}
    assert estimated["bypass"] == added["bypass"] > 0
    ladder = sum(p.numel() for n, p in result.module.named_parameters() if n.startswith("utune.bypass."))
    assert ladder == added["bypass"]


# -- the formula against eager PyTorch in float64 ----------------------------------------------------


def _adapter(x: torch.Tensor, adapter: nn.Module, channels_first: bool) -> torch.Tensor:
    """W_up(relu(W_down(x))), written out with the adapter's weights."""
    if channels_first:
        down, up = adapter.down, adapter.up
        hidden = F.relu(F.conv2d(x, down.weight, down.bias, stride=down.stride))
        return F.conv2d(hidden, up.weight, up.bias)
    return F.linear(F.relu(F.linear(x, adapter.down.weight, adapter.down.bias)), adapter.up.weight, adapter.up.bias)


def _reference_join(features: list[torch.Tensor], first_input: torch.Tensor, steps, join, channels_first: bool):
    """s_0 = x_0; s_i = x_i + U_h(x_i) + P(s_{i-1}) + U_v(s_{i-1}); gamma * norm(s_L) + beta."""
    state = first_input
    for feature, step in zip(features, steps):
        carried = 0
        if state.shape[1 if channels_first else -1] == feature.shape[1 if channels_first else -1]:
            factor = state.shape[-1] // feature.shape[-1] if channels_first else 1
            carried = F.avg_pool2d(state, factor) if factor > 1 else state
        if step.vertical is not None:
            carried = carried + _adapter(state, step.vertical, channels_first)
        state = feature + _adapter(feature, step.horizontal, channels_first) + carried
    axis = 1 if channels_first else -1
    normed = (state - state.mean(axis, keepdim=True)) / torch.sqrt(state.var(axis, unbiased=False, keepdim=True) + 1e-6)
    return normed * join.gamma + join.beta


@pytest.mark.parametrize(("arch", "blocks", "channels_first"), [("vit", "blocks", False), ("resnet", "layer", True)])
def test_the_ladder_computes_the_papers_formula_in_float64(arch, blocks, channels_first):
    """The eager model, with a hook on its last block adding the ladder computed by hand from its blocks'
    outputs, against the rewritten graph: both in float64, tuners away from identity."""
    model, x, result = _tuned(arch)
    _away_from_identity(result.module)
    model, gm, x = model.double(), result.module.double(), x.double()
    steps = [m for m in gm.modules() if isinstance(m, BypassStep)]
    join = next(m for m in gm.modules() if isinstance(m, BypassJoin))
    stems = [m for name, m in model.named_modules() if _is_block(name, blocks, arch)]
    assert len(stems) == len(steps)
    seen: dict = {"features": []}

    def record(module, args, output):
        if module is stems[0]:
            seen["first_input"] = args[0]
        seen["features"].append(output)
        if module is stems[-1]:
            return output + _reference_join(seen["features"], seen["first_input"], steps, join, channels_first)
        return output

    handles = [stem.register_forward_hook(record) for stem in stems]
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        actual = gm(x)
    assert (actual - expected).abs().max() <= 1e-10 * expected.abs().max()


def _is_block(name: str, blocks: str, arch: str) -> bool:
    parts = name.split(".")
    if arch == "vit":
        return len(parts) == 2 and parts[0] == blocks
    return len(parts) == 2 and parts[0].startswith(blocks) and parts[0][len(blocks) :].isdigit()


# -- nothing of the backbone is kept for backward -----------------------------------------------------


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_no_backbone_operation_is_recorded_for_backward(arch):
    """In training mode, the only nodes whose outputs require grad are the ladder's and those after the
    join (the final norm, pooling, classifier): autograd keeps nothing of the backbone's blocks."""
    model, x, result = _tuned(arch)
    gm = result.module
    join = next(
        n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), BypassJoin)
    )
    total = next(u for u in join.users if u.target is operator.add)
    after = _downstream(total)
    recorded: list[str] = []

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if isinstance(value, torch.Tensor) and value.requires_grad and n.op != "get_attr":
                recorded.append(n)
            return value

    set_training(gm, True)  # not train(): graphs of the torch.export front end refuse it
    Recorder(gm).run(x)
    backbone = [n.name for n in recorded if TUNER_META not in n.meta and n not in after]
    assert backbone == []
    assert any(TUNER_META in n.meta for n in recorded) and any(n in after for n in recorded)


def _downstream(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.users)
    return seen


# -- training and the zoo chain ---------------------------------------------------------------------


def test_a_few_steps_train_the_ladder_from_its_identity_start():
    model, x, result = _tuned("vit")
    gm = result.module
    gm.train()
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    trainable = [p for p in gm.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(gm(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    ups = [m.horizontal.up.weight for m in gm.modules() if isinstance(m, BypassStep)]
    assert all(float(w.abs().max()) > 0 for w in ups)  # zero at the start: the ladder itself trained


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_the_zoo_chain_passes_with_the_bypass_rule_file(arch):
    """One rung per block, identity, one train step, fold (the ladder kept), ONNX export and ONNX Runtime
    parity at batch 1 and 2, with the tuners moved away from identity."""
    model, x = MODELS[arch]()
    state: dict = {}
    record = run_module_chain(model, (x,), arch, rule_files=("res_tuning_bypass",), state=state)
    assert record["error"] is None and record["last_stage"] == "parity", record["error"]
    assert record["identity_difference"] == 0.0  # exact: the join adds 0 * norm + 0
    modules = list(state["result"].module.modules())
    assert sum(isinstance(m, BypassStep) for m in modules) == STEMS[arch]
    assert sum(isinstance(m, BypassJoin) for m in modules) == 1
    assert record["folded"]["kept"] == STEMS[arch] + 1 and record["folded"]["folded"] == 0
    kept = [entry for entry in state["folded"].entries if entry.rule == "bypass"]
    assert {entry.status for entry in kept} == {KEPT} and "side network" in kept[0].reason
    moved = _logits(state["tuned_outputs"]) - _logits(state["expected"])
    assert float(moved.abs().max()) > 1e-4  # parity was checked away from identity


def test_fold_keeps_the_ladder_and_the_api_refuses_to_fold_it():
    model, x, result = _tuned("vit")
    folded = fold(result.module, result.summaries)
    assert [e.status for e in folded.entries if e.rule == "bypass"] == [KEPT] * 4
    with pytest.warns(UserWarning, match="returns the rewritten torch.fx GraphModule"):
        graph = utune_fx.tune(MODELS["vit"]()[0], "res_tuning_bypass", example_inputs=x)
    with pytest.raises(UtuneError, match=r"^cannot fold rule 'bypass' \(res_tuning_bypass at utune.bypass.0\): a side"):
        utune_fx.fold(graph)


# -- refusals -----------------------------------------------------------------------------------------


class _Mlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class _TokenMerging(nn.Module):
    """Two residual blocks with a merge of token pairs between: [B, 8, C] -> [B, 4, C]."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.first, self.merge, self.second = _Mlp(width), nn.Linear(2 * width, width), _Mlp(width)

    def forward(self, x):
        x = self.first(x)
        x = self.merge(x.reshape(x.shape[0], x.shape[1] // 2, -1))
        return self.second(x)


def test_tokens_whose_count_changes_are_refused_in_one_line():
    model, x = _TokenMerging().eval(), torch.randn(2, 8, 16)
    rules = load_rules(RULES)
    with pytest.raises(UtuneError) as error:
        rewrite(trace(model, (x,)), rules)
    message = str(error.value)
    assert "\n" not in message and "region second" in message
    assert "from 2x8x16 to 2x4x16" in message and "downsample feature maps by whole factors" in message


def test_vertical_false_drops_the_vertical_res_tuners_where_the_channels_stay(tmp_path):
    path = tmp_path / "horizontal.yaml"
    path.write_text(RULES.read_text().replace("settings: {hidden: 8}", "settings: {hidden: 8, vertical: false}"))
    model, x = MODELS["resnet"]()
    result = rewrite(trace(model, (x,)), load_rules(path))
    steps = [m for m in result.module.modules() if isinstance(m, BypassStep)]
    # resnet10t, one block a stage: layer1 keeps the stem's 64 channels, layers 2-4 double them, and
    # where the channels change the vertical adapter maps them (nothing else carries the state)
    assert [step.vertical is not None for step in steps] == [False, True, True, True]
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))


def test_a_saved_ladder_loads_back_into_the_same_outputs(tmp_path):
    """save_tuned / load_tuned (what train, fold and export read): the rebuilt ladder, away from identity,
    computes what the saved one did."""
    from utune_fx.rewrite.artifact import TunedSource, build_tuned, load_tuned, save_tuned

    source = TunedSource("timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2&num_classes=3", [], "fx")
    rules = load_rules(RULES)
    result = build_tuned(source, [rules])
    _away_from_identity(result.module)
    save_tuned(result, [rules], source, tmp_path / "tuned")
    loaded = load_tuned(tmp_path / "tuned")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, actual = result.module(x), loaded.module(x)
    assert torch.equal(actual, expected)
    assert not torch.allclose(expected, loaded.base_model(x), atol=1e-3)


class _TwoTowers(nn.Module):
    """Two stacks of residual blocks on two inputs (a CLIP, or an encoder and its decoder): neither
    tower's blocks are computed from the other's."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.text = nn.Sequential(_Mlp(width), _Mlp(width), nn.LayerNorm(width))
        self.image = nn.Sequential(_Mlp(width), _Mlp(width), _Mlp(width), nn.LayerNorm(width))

    def forward(self, a, b):
        return self.text(a).mean(1) * self.image(b).mean(1)


def test_each_tower_gets_a_ladder_and_a_join_of_its_own():
    model, inputs = _TwoTowers().eval(), (torch.randn(2, 5, 16), torch.randn(2, 7, 16))
    gm = trace(model, inputs)
    rules = load_rules(RULES)
    report = match_report(gm, model, rules, "", site_refusal, MatchContext(gm), chained=chain_sizes)
    result = rewrite(gm, rules)
    joins = [name for name, m in result.module.named_modules() if isinstance(m, BypassJoin)]
    assert joins == ["utune.bypass.2", "utune.bypass.6"]  # after 2 text rungs, after 3 image rungs
    added = next(s.added_parameters for s in result.summaries if s.rule == "bypass")
    assert next(e["added_parameters"] for e in report["results"] if e["rule"] == "bypass") == added
    with torch.no_grad():
        assert torch.equal(result.module(*inputs), model(*inputs))
        _away_from_identity(result.module)
        moved = result.module(*inputs)
    image_only = dict(result.module.named_parameters())["utune.bypass.6.gamma"]
    with torch.no_grad():
        image_only.zero_()
        dict(result.module.named_parameters())["utune.bypass.6.beta"].zero_()
        text_joined = result.module(*inputs)
    assert not torch.allclose(moved, text_joined) and not torch.allclose(text_joined, model(*inputs))


class _SideBySide(nn.Module):
    """x + mlp_a(ln(x)) + mlp_b(ln(x)): two MLPs reading one tensor (a parallel block's branches)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp_a = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.mlp_b = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        h = self.norm(x)
        return x + self.mlp_a(h) + self.mlp_b(h)


def test_stems_side_by_side_are_refused_in_one_line(tmp_path):
    path = tmp_path / "mlps.yaml"
    path.write_text("version: 1\nrules:\n  - {name: side, match: mlp, tuner: res_tuning_bypass}\n")
    model, x = _SideBySide().eval(), torch.randn(2, 5, 16)
    with pytest.raises(UtuneError) as error:
        rewrite(trace(model, (x,)), load_rules(path))
    message = str(error.value)
    assert "\n" not in message and "region mlp_b: this stem reads what mlp_a is computed from" in message
