"""torchvision's VisionTransformer and SwinTransformer, and nn.MultiheadAttention in a model of one's own,
under the default front end: torch.fx hides their attention (nn.MultiheadAttention is one fx leaf; Swin's
``shifted_window_attention`` is a wrapped function), so ``auto`` turns to torch.export, which sees inside.
Ground truth: the constructors' layer counts, the attention modules' own parameter names, eager PyTorch and
ONNX Runtime (utune_fx.zoo.stages.run_module_chain: trace -> match -> rewrite -> identity -> train ->
tuners off identity -> fold -> ONNX export -> parity)."""

import io
from pathlib import Path

import pytest
import torch
import torchvision  # conftest.py imported utune_fx first: its shim makes this import work on CPU torch
from rich.console import Console
from torch import nn

from utune_fx.errors import UtuneError
from utune_fx.fold import relative_difference
from utune_fx.inspection import inspect_graph, render
from utune_fx.match import load_rules
from utune_fx.rewrite import rewrite
from utune_fx.trace import node_info, trace, trace_report
from utune_fx.zoo.stages import STAGES, run_module_chain

RULES = Path(__file__).resolve().parents[1] / "rules"
LAYERS = 2  # encoder layers of the ViT, blocks per stage of the Swin (2 stages), MHA blocks of the toy
IDENTITY_RTOL = 1e-6  # tuners add exact zeros; float32 kernels may still round differently
FOLD_RTOL = 1e-5  # folded vs unfolded, float32, relative to the largest output
MOVED = 1e-2  # tuners moved off identity change the outputs by at least this much (relative)
PARITY_ATOL = 1e-4  # ONNX Runtime vs PyTorch, max abs error at batch 1 and 2
TRACE_RTOL = 1e-5  # the traced graph vs the eager model (its MHA may take the fused fast path)


def _vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=LAYERS, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zeroes it: every output would be 0
    return model.eval(), torch.randn(2, 3, 32, 32)


def _swin():
    torch.manual_seed(0)
    model = torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[LAYERS, LAYERS], num_heads=[2, 2], window_size=[2, 2], num_classes=10
    )
    return model.eval(), torch.randn(2, 3, 32, 32)  # an 8x8 token grid: windows of 2, shifted by 1


class MhaBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class MhaClassifier(nn.Module):
    def __init__(self, width: int = 32, classes: int = 5):
        super().__init__()
        self.blocks = nn.Sequential(*(MhaBlock(width) for _ in range(LAYERS)))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(x).mean(dim=1))


def _mha_model():
    torch.manual_seed(0)
    return MhaClassifier().eval(), torch.randn(2, 6, 32)


# model -> (its attention modules, the weights LoRA must reach in each, the classifier's weight)
CASES = {
    "vit": (
        _vit,
        [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(LAYERS)],
        ("in_proj_weight", "out_proj.weight"),
        "heads.head.weight",
    ),
    "swin": (
        _swin,
        [f"features.{stage}.{i}.attn" for stage in (1, 3) for i in range(LAYERS)],
        ("qkv.weight", "proj.weight"),
        "head.weight",
    ),
    "mha": (
        _mha_model,
        [f"blocks.{i}.attn" for i in range(LAYERS)],
        ("in_proj_weight", "out_proj.weight"),
        "head.weight",
    ),
}


def _weight(node: torch.fx.Node) -> str:
    """The parameter a linear node multiplies by (its get_attr target)."""
    weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    return str(weight.target)


@pytest.mark.parametrize("case", list(CASES))
def test_default_front_end_sees_the_attention_and_lora_lands_on_its_projections(case):
    build, attentions, projections, classifier = CASES[case]
    model, x = build()
    with torch.no_grad():
        eager = model(x)  # the chain trains the classifier in place (the head rule)
    state: dict = {}
    record = run_module_chain(model, x, case, state=state)
    assert record["last_stage"] == "parity", record["error"]
    assert list(record["stages"]) == list(STAGES)

    # fx hid the attention, so auto took torch.export; the report says which module hid it
    report = trace_report(state["gm"])
    assert record["frontend"] == "export"
    assert report.fx_failure.startswith(f"{len(attentions)} module(s) opaque to torch.fx, first {attentions[0]}:")
    assert relative_difference(state["expected"], eager) < TRACE_RTOL

    # exactly the constructor's attentions and FFNs; LoRA on each attention's projections and the head
    n = len(attentions)
    assert {rule: count for rule, count in record["found"].items() if count} == {
        "mha": n,
        "ffn": n,
        "lora": 2 * n,
        "classifier": 1,
    }
    assert [region.scope for region in state["matches"]["mha"].regions] == attentions
    lora = [region.anchor for region in state["matches"]["lora"].regions]
    assert sorted(_weight(node) for node in lora) == sorted(f"{a}.{p}" for a in attentions for p in projections)
    # a projection whose weight is its own submodule's (out_proj, qkv, proj) is scoped to that submodule
    expected_scopes = {f"{a}.{p.rpartition('.')[0]}".rstrip(".") for a in attentions for p in projections}
    assert {node_info(node).scope for node in lora} == expected_scopes
    assert [_weight(region.anchor) for region in state["matches"]["classifier"].regions] == [classifier]

    # identity at init; one train step reaches every tuner; off identity, fold equals unfolded
    assert record["identity_difference"] <= IDENTITY_RTOL
    tuners = {".".join(name.split(".")[:3]) for name in state["gradient_norms"]}
    assert len(tuners) == 2 * n + 2 * n  # dual U-Tuner (mha, ffn) and LoRA
    assert relative_difference(state["tuned_outputs"], state["expected"]) > MOVED
    assert record["folded"]["folded"] == 2 * n and record["folded"]["kept"] == 2 * n
    assert record["fold_difference"] < FOLD_RTOL
    assert "parity_relative" not in record and record["parity"] < PARITY_ATOL


def test_fx_front_end_reports_every_module_that_hides_attention_and_nothing_else():
    # Swin's stochastic_depth and _patch_merging_pad are wrapped functions too, but compute no attention
    model, x = _swin()
    report = trace_report(trace(model, x, frontend="fx"))
    assert report.frontend == "fx"
    assert [(o.path, o.class_name) for o in report.opaque] == [(a, "ShiftedWindowAttention") for a in CASES["swin"][1]]
    assert all("shifted_window_attention()" in o.reason for o in report.opaque)
    mha, inputs = _mha_model()
    report = trace_report(trace(mha, inputs, frontend="fx"))
    assert [(o.path, o.class_name) for o in report.opaque] == [(a, "MultiheadAttention") for a in CASES["mha"][1]]


def _inspect_text(model, x, frontend):
    gm = trace(model, x, frontend=frontend)
    console = Console(file=io.StringIO(), width=400)
    render(inspect_graph(gm, model, "swin"), console)
    return console.file.getvalue()


def test_inspect_names_the_module_that_hides_the_attention():
    model, x = _swin()
    text = _inspect_text(model, x, "fx")
    assert "none: every module was traced through" not in text
    for path in CASES["swin"][1]:
        assert path in text
    assert "shifted_window_attention" in text and "--frontend export" in text
    text = _inspect_text(model, x, "auto")  # torch.export sees inside; the report says why it was used
    assert "traced by export" in text and "features.1.0.attn" in text and "shifted_window_attention" in text


def test_prefix_joins_the_attention_torch_export_shows_and_prompts_are_refused_with_the_reason():
    model, x = _mha_model()
    with torch.no_grad():
        eager = model(x)
    result = rewrite(trace(model, x), load_rules(RULES / "prefix.yaml"))  # its aten sdpa takes the prefix
    assert [(s.tuner, s.regions) for s in result.summaries] == [("prefix", LAYERS), ("head", 1)]
    with torch.no_grad():
        assert relative_difference(result.module(x), eager) <= IDENTITY_RTOL
        generator = torch.Generator().manual_seed(1)
        for name, p in result.module.named_parameters():
            if name.startswith("utune."):
                p.add_(torch.randn(p.shape, generator=generator) * 0.02)
        assert relative_difference(result.module(x), eager) > MOVED / 10  # the prefix's gates moved by ~0.02
    # prompts replay the key/value path on more tokens; torch.export fixed the 6 tokens in a view
    for rules in ("vpt_deep", "vpt_shallow"):
        with pytest.raises(UtuneError, match=r"region blocks\.0: view\S* fixes the token count at 6 \(torch\.export"):
            rewrite(trace(model, x), load_rules(RULES / f"{rules}.yaml"))
