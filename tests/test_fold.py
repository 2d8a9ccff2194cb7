"""Folding: every tuner kind merges exactly or stays with a reason; LoRA-only folds give the base graph."""

import textwrap

import pytest
import timm
import torch
from torch import nn

from utune_fx.fold import CONSTANT, FOLDED, IN_PLACE, KEPT, fold, folded_difference
from utune_fx.match import load_rules
from utune_fx.match.report import match_report
from utune_fx.rewrite import rewrite
from utune_fx.trace import trace

RTOL = 1e-5  # folded vs unfolded, float32, relative to the largest output

ARCHS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)), 224),
    "resnet": ("resnet18", {}, 64),
    "convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1)), 64),
}

# every foldable kind at once: LoRA on attention linears and block convs (ConvNeXt's are
# depthwise), identity-activation adapters beside MLP linears, scale/shift after every norm
FOLDABLE_MIX = """
    version: 1
    rules:
      - {name: lora, match: {any_of: [{node: {kind: linear}, within: attention}, {node: {kind: conv}, within: block}]},
         tuner: lora, settings: {rank: 4}}
      - {name: par, match: {node: {kind: linear}, within: mlp}, tuner: parallel_adapter,
         settings: {activation: identity, hidden: 4, scale: learned}}
      - {name: ss, match: {node: {kind: norm}}, tuner: scale_shift}
      - {name: head, match: head, tuner: bitfit}
    """
LORA_ONLY = """
    version: 1
    rules:
      - {name: lora, match: {any_of: [{node: {kind: linear}, within: attention}, {node: {kind: conv}, within: block}]},
         tuner: lora, settings: {rank: 4}}
    """


def _model(arch):
    name, kwargs, size = ARCHS[arch]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():  # timm starts residual branches near zero (last BN gamma 0, ConvNeXt's 1e-6 layer
        for parameter_name, parameter in model.named_parameters():  # scale): wake them so tuners there act
            if parameter.dim() == 1 and parameter_name.endswith(("weight", "gamma")):
                parameter.uniform_(0.5, 1.5)
    return model, torch.randn(2, 3, size, size)


def _rules(tmp_path, body, name="rules.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return load_rules(path)


def _tuned(model, x, rules, dtype=torch.float32):
    """Rewrite and move every tuner away from identity, so folding has something to do."""
    result = rewrite(trace(model, x), rules)
    with torch.no_grad():
        start = result.module(x)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in result.module.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    with torch.no_grad():
        assert (result.module(x) - start).abs().max() > 1e-3  # the tuners act
    result.module.to(dtype)
    return result


@pytest.mark.parametrize("arch", list(ARCHS))
def test_foldable_mix_is_exact_and_leaves_no_tuner(arch, tmp_path):
    model, x = _model(arch)
    result = _tuned(model, x, _rules(tmp_path, FOLDABLE_MIX))
    folded = fold(result.module, result.summaries)
    assert {e.status for e in folded.entries if e.rule != "head"} == {FOLDED}, [
        e for e in folded.entries if e.status != FOLDED
    ]
    assert [e.status for e in folded.entries if e.rule == "head"] == [IN_PLACE]
    assert not any(name.startswith("utune") for name, _ in folded.module.named_modules() if name)
    assert folded_difference(result.module, folded.module, (x,)) < RTOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_only_fold_is_the_base_graph_and_loads_into_the_plain_model(arch, tmp_path):
    model, x = _model(arch)
    base = trace(model, x)
    base_nodes = [(n.op, str(n.target), n.name) for n in base.graph.nodes]
    base_shapes = {name: tuple(p.shape) for name, p in base.named_parameters()}
    result = _tuned(model, x, _rules(tmp_path, LORA_ONLY))
    before = {name: t.clone() for name, t in result.module.state_dict().items()}
    folded = fold(result.module, result.summaries)
    assert [(n.op, str(n.target), n.name) for n in folded.module.graph.nodes] == base_nodes
    assert {name: tuple(p.shape) for name, p in folded.module.named_parameters()} == base_shapes
    assert folded_difference(result.module, folded.module, (x,)) < RTOL
    # folding works on a copy: the tuned model (and the base weights it shares) did not change
    assert all(torch.equal(before[name], t) for name, t in result.module.state_dict().items())
    plain = timm.create_model(ARCHS[arch][0], pretrained=False, **ARCHS[arch][1]).eval()
    # the graph keeps non-persistent buffers (Swin's relative position index) as state; the rest loads
    state = {name: t for name, t in folded.module.state_dict().items() if name in plain.state_dict()}
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.allclose(plain(x), folded.module(x), rtol=0, atol=1e-6)


# one row per tuner kind: (arch, rule, expected status, what the reason says)
KINDS = [
    ("vit", "{name: t, match: {node: {kind: linear, scope: '**.qkv'}}, tuner: lora}", FOLDED, "blocks.0.attn.qkv"),
    ("resnet", "{name: t, match: {node: {kind: conv, scope: 'layer2.0.conv1'}}, tuner: lora}", FOLDED, "conv1"),
    (
        "convnext",
        "{name: t, match: {node: {kind: conv, scope: '**.conv_dw'}}, tuner: lora, settings: {rank: 3}}",
        FOLDED,
        "conv_dw",
    ),
    (
        "vit",
        "{name: t, match: {node: {kind: linear, scope: '**.fc1'}}, tuner: parallel_adapter, "
        "settings: {activation: identity}}",
        FOLDED,
        "fc1",
    ),
    (
        "resnet",
        "{name: t, match: {node: {kind: conv, scope: 'layer2.0.conv1'}}, tuner: parallel_adapter, "
        "settings: {activation: identity}}",
        FOLDED,
        "layer2.0.conv1",
    ),  # 3x3 stride 2: centre tap
    (
        "vit",
        "{name: t, match: {node: {kind: linear, scope: '**.proj'}}, tuner: sequential_adapter, "
        "settings: {activation: identity}}",
        FOLDED,
        "proj",
    ),
    ("vit", "{name: t, match: {node: {kind: norm, scope: '**.norm1'}}, tuner: scale_shift}", FOLDED, "norm1"),
    ("resnet", "{name: t, match: {node: {kind: norm, scope: 'layer1.*.bn1'}}, tuner: scale_shift}", FOLDED, "bn1"),
    (
        "convnext",
        "{name: t, match: {node: {kind: conv, scope: '**.fc2'}}, tuner: scale_shift, settings: {shift: false}}",
        FOLDED,
        "fc2",
    ),
    ("vit", "{name: t, match: ffn, tuner: bitfit}", IN_PLACE, "own weights"),
    ("vit", "{name: t, match: block, tuner: prompt, settings: {deep: true, length: 3}}", CONSTANT, "constant"),
    (
        "vit",
        "{name: t, match: attention, tuner: prefix, settings: {reparam_hidden: 8, parallel: false}}",
        KEPT,
        "constant tensors",
    ),
    # must not fold: nonlinear, or more than one layer
    ("vit", "{name: t, match: attention, tuner: parallel_adapter}", KEPT, "nonlinear"),
    (
        "vit",
        "{name: t, match: ffn, tuner: parallel_adapter, settings: {activation: identity}}",
        KEPT,
        "more than one linear",
    ),
    (
        "convnext",
        "{name: t, match: {node: {kind: conv, scope: '**.conv_dw'}}, tuner: parallel_adapter, "
        "settings: {activation: identity}}",
        KEPT,
        "groups",
    ),
    ("vit", "{name: t, match: block, tuner: prompt, settings: {length: 3}}", KEPT, "change with the input"),
]


@pytest.mark.parametrize("arch,rule,status,reason", KINDS, ids=[f"{a}-{s}-{i}" for i, (a, _, s, _) in enumerate(KINDS)])
def test_each_tuner_kind_folds_or_says_why(arch, rule, status, reason, tmp_path):
    model, x = _model(arch)
    result = _tuned(model, x, _rules(tmp_path, f"version: 1\nrules:\n  - {rule}\n"))
    folded = fold(result.module, result.summaries)
    entry = folded.entries[0]
    assert entry.status == status and reason in entry.reason, entry
    assert folded_difference(result.module, folded.module, (x,)) < RTOL
    remaining = sum(p.numel() for n, p in folded.module.named_parameters() if n.startswith("utune"))
    if status in (FOLDED, IN_PLACE):
        assert remaining == 0
    if status == CONSTANT:  # the prompt tokens are gone; only the gates stay as parameters
        assert not any(n.endswith(".tokens") for n, _ in folded.module.named_parameters())
        assert any(name.startswith("utune_constant_") for name, _ in folded.module.named_buffers())


def test_weight_shared_by_prompt_replay_is_not_folded(tmp_path):
    model, x = _model("vit")
    rules = _rules(
        tmp_path,
        """
        version: 1
        rules:
          - {name: vpt, match: block, tuner: prompt, settings: {deep: true, length: 2}}
          - {name: ss, match: {node: {kind: linear, scope: '**.qkv'}}, tuner: scale_shift}
        """,
    )
    result = _tuned(model, x, rules)
    entries = fold(result.module, result.summaries).entries
    kept = [e for e in entries if e.rule == "ss"]
    assert kept and all(e.status == KEPT and "called 2 times" in e.reason for e in kept)


def test_half_precision_models_fold_in_float32(tmp_path):
    model, x = _model("vit")
    result = _tuned(model, x, _rules(tmp_path, LORA_ONLY), dtype=torch.bfloat16)
    weight = result.module.get_submodule("blocks.0.attn.qkv").weight.detach().float()
    branch = result.module.get_submodule("utune.lora.0")
    delta = branch.lora_B.weight.float() @ branch.lora_A.weight.float() * branch.scaling
    folded = fold(result.module, result.summaries).module
    merged = folded.get_submodule("blocks.0.attn.qkv").weight
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, (weight + delta).to(torch.bfloat16))  # one rounding, at the end


def test_lora_on_depthwise_convs_has_the_estimated_size(tmp_path):
    model, x = _model("convnext")
    rules = _rules(tmp_path, LORA_ONLY)
    estimate = match_report(trace(model, x), model, rules, "convnext")["results"][0]["added_parameters"]
    result = rewrite(trace(model, x), rules)
    branch = result.module.get_submodule("utune.lora.0")
    conv = model.stages[0].blocks[0].conv_dw
    assert branch.lora_A.groups == conv.groups == conv.in_channels  # depthwise: rank 1 per channel
    assert estimate == result.summaries[0].added_parameters
    assert branch.lora_A.weight.numel() + branch.lora_B.weight.numel() == conv.weight.numel() + conv.out_channels


def test_fold_keeps_training_mode_and_gradients_off(tmp_path):
    model, x = _model("vit")
    result = _tuned(model, x, _rules(tmp_path, FOLDABLE_MIX))
    folded = fold(result.module, result.summaries).module
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    assert any(p.requires_grad for p in result.module.parameters())
    assert isinstance(folded.get_submodule("blocks.0.mlp.fc1"), nn.Linear)


def test_rules_after_prompts_see_an_annotated_graph_and_fold_with_them(tmp_path):
    """A second rule file reads the nodes the prompts inserted (it used to fail on their sum)."""
    model, x = _model("vit")
    rules = [load_rules(f"rules/{name}.yaml") for name in ("vpt_deep", "dual_utuner")]
    result = _tuned(model, x, rules)
    folded = fold(result.module, result.summaries)
    statuses = {(e.rule, e.status) for e in folded.entries}
    assert {("prompts", CONSTANT), ("mha", KEPT), ("ffn", KEPT)} <= statuses
    assert folded_difference(result.module, folded.module, (x,)) < RTOL


def test_graphs_of_the_torch_export_front_end_fold_too(tmp_path):
    """aten.linear / aten.layer_norm calls with get_attr weights (a Hugging Face BERT)."""
    pytest.importorskip("transformers")
    from toy_models import BertLastHidden, small_bert

    bert = small_bert()
    ids = torch.randint(0, 64, (2, 8))
    base = trace(BertLastHidden(bert).eval(), ids)
    base_nodes = [(n.op, str(n.target)) for n in base.graph.nodes]
    for body, expected in ((FOLDABLE_MIX, None), (LORA_ONLY, base_nodes)):
        result = _tuned(BertLastHidden(bert).eval(), ids, _rules(tmp_path, body))
        folded = fold(result.module, result.summaries)
        assert {e.status for e in folded.entries} <= {FOLDED, IN_PLACE} and folded.count(FOLDED) >= 8
        assert folded_difference(result.module, folded.module, (ids,)) < RTOL
        if expected is not None:
            assert [(n.op, str(n.target)) for n in folded.module.graph.nodes] == expected


class FunctionalConvs(nn.Module):
    """Convolutions as calls with parameter weights (what torch.export graphs hold), one grouped."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(8) * 0.1)
        self.depthwise = nn.Parameter(torch.randn(8, 1, 3, 3) * 0.3)

    def forward(self, x):
        y = torch.nn.functional.conv2d(x, self.weight, self.bias, stride=2, padding=1)
        return torch.nn.functional.conv2d(y, self.depthwise, None, padding=1, groups=8) + y


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_lora_on_functional_convolutions_folds(tmp_path, frontend):
    torch.manual_seed(0)
    model, x = FunctionalConvs().eval(), torch.randn(2, 3, 16, 16)
    rules = _rules(
        tmp_path,
        "version: 1\nrules:\n  - {name: lora, match: {node: {kind: conv}}, tuner: lora, settings: {rank: 2}}\n",
    )
    result = rewrite(trace(model, x, frontend=frontend), rules)
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))
        for name, parameter in result.module.named_parameters():
            if name.startswith("utune."):
                parameter.normal_(0, 0.1)
    branches = [m for n, m in result.module.named_modules() if n.startswith("utune.lora.") and n.count(".") == 2]
    assert [(b.lora_A.stride, b.lora_A.groups) for b in branches] == [((2, 2), 1), ((1, 1), 8)]
    folded = fold(result.module, result.summaries)
    assert [e.status for e in folded.entries] == [FOLDED, FOLDED]
    assert folded_difference(result.module, folded.module, (x,)) < RTOL
    with torch.no_grad():
        assert (result.module(x) - model(x)).abs().max() > 1e-3


class TransposedAndFixedConvs(nn.Module):
    """A transposed conv (grouped, strided: LowFormer's upsampling) and a conv whose weight is a
    buffer (a blur filter, as timm's BlurPool)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1, output_padding=0, groups=2)
        self.register_buffer(
            "filt",
            torch.tensor([1.0, 2.0, 1.0]).outer(torch.tensor([1.0, 2.0, 1.0])).div(16).expand(6, 1, 3, 3).contiguous(),
        )

    def forward(self, x):
        y = self.up(self.down(x))
        return torch.nn.functional.conv2d(y, self.filt, padding=1, groups=6)


def test_lora_on_transposed_convs_and_buffer_weights_folds(tmp_path):
    torch.manual_seed(0)
    model, x = TransposedAndFixedConvs().eval(), torch.randn(2, 3, 16, 16)
    rules = _rules(
        tmp_path,
        "version: 1\nrules:\n  - {name: lora, match: {node: {kind: conv}}, tuner: lora, settings: {rank: 2}}\n",
    )
    result = rewrite(trace(model, x), rules)
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))
        for name, parameter in result.module.named_parameters():
            if name.startswith("utune."):
                parameter.normal_(0, 0.1)
        assert (result.module(x) - model(x)).abs().max() > 1e-3
    up = result.module.get_submodule("utune.lora.1")
    assert isinstance(up.lora_A, nn.ConvTranspose2d) and up.lora_A.groups == 2 and up.lora_A.stride == (2, 2)
    report = match_report(trace(model, x), model, rules, "toy")
    assert report["added_parameters"] == sum(
        p.numel() for n, p in result.module.named_parameters() if n.startswith("utune.")
    )
    folded = fold(result.module, result.summaries)
    assert [e.status for e in folded.entries] == [FOLDED] * 3
    assert folded_difference(result.module, folded.module, (x,)) < RTOL
