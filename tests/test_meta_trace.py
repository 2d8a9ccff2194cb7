"""Tracing without computing: shapes from the meta device, fallbacks, models built on the meta device.

trace(model, x)  ->  every node's NodeInfo equals the one a real forward pass gives, node by node,
                     on timm, torchvision, toy and Hugging Face (torch.export) models; no op reads a
                     weight or the input; the report says 'meta'
a node the meta device cannot run  ->  fake tensors, then a real forward; the report says which, and why
LlamaForCausalLM built on the meta device  ->  traced, matched, rewritten; tuners on the meta device
the 7B Llama config  ->  in a fresh process: 32 x (q, k, v, o) LoRA regions, 32 attentions and 32 FFNs,
                         peak resident memory under 4 GB (the time is printed, not asserted)
"""

import sys
from pathlib import Path

import pytest
import timm
import torch
import toy_models
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.swin_transformer import SwinTransformer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from utune_fx.match import find_operations, load_rules, match_rules
from utune_fx.rewrite import rewrite
from utune_fx.trace import node_info, trace, trace_report
from utune_fx.trace.annotate import annotate
from utune_fx.trace.shape_propagation import propagate_shapes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import trace_depth  # noqa: E402


def _llama(**overrides) -> LlamaForCausalLM:
    config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(LlamaConfig(**config | overrides)).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


CASES = {
    "timm ViT (fx)": lambda: (
        timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2),
        torch.randn(2, 3, 32, 32),
    ),
    "timm ResNet (fx, batch norm)": lambda: (timm.create_model("resnet18"), torch.randn(2, 3, 32, 32)),
    "timm Swin (fx)": lambda: (
        timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, depths=(1, 1, 1, 1)),
        torch.randn(1, 3, 64, 64),
    ),
    "torchvision Swin (fx: hidden attention)": lambda: (
        SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=[4, 4]),
        torch.randn(1, 3, 32, 32),
    ),
    "toy shape branch (fx)": lambda: (toy_models.PadToMultiple(), torch.randn(2, 5, 8)),
    "toy gated MLP (fx)": lambda: (toy_models.TokensWithPosEmbed(), torch.randn(2, 5, 16)),
    "GPT-2 (export, written-out GELU)": lambda: (
        GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)),
        _ids(),
    ),
    "Llama (export, RMSNorm, rotary)": lambda: (_llama(), _ids()),
}


@pytest.mark.parametrize("case", CASES)
def test_meta_annotations_equal_those_of_a_real_forward_node_by_node(case):
    model, x = CASES[case]()
    model.eval()
    gm = trace(model, (x,))
    assert trace_report(gm).shapes_by == "meta", trace_report(gm).shapes_fallback
    by_meta = {node.name: node_info(node) for node in gm.graph.nodes}
    annotate(gm, (x,), shapes_by="forward")
    by_forward = {node.name: node_info(node) for node in gm.graph.nodes}
    assert by_meta == by_forward
    assert all(info.shape for info in by_meta.values() if info.op_kind in ("linear", "conv"))  # shapes were recorded
    fake = propagate_shapes(gm, (x,), "fake")
    assert fake.method == "fake"
    assert {n.name: s for n, s in fake.shapes.items()} == {
        name: (info.shape, info.dtype, info.item_shapes) for name, info in by_forward.items()
    }


class _Reads(TorchDispatchMode):
    """Records every op that reads one of the watched tensors' memory."""

    def __init__(self, watched: list[torch.Tensor]):
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in watched}
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for arg in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(arg, torch.Tensor) and arg.device.type != "meta":
                if arg.untyped_storage().data_ptr() in self.storages:
                    self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["timm ViT (fx)", "toy shape branch (fx)", "torchvision Swin (fx: hidden attention)"])
def test_tracing_a_materialised_model_reads_neither_its_weights_nor_its_input(case):
    """fx tracing, shape branches, the hidden-attention check (make_fx of a wrapped call) and annotation."""
    model, x = CASES[case]()
    model.eval()
    watched = [x, *model.parameters(), *model.buffers()]
    with _Reads(watched) as reads:
        gm = trace(model, (x,), frontend="fx")
    assert reads.reads == []
    report = trace_report(gm)
    assert report.shapes_by == "meta"
    if "hidden attention" in case:  # found on meta values: torchvision's shifted_window_attention
        assert [o.class_name for o in report.opaque] == ["ShiftedWindowAttention"] * 2
    elif "shape branch" in case:  # decided on meta values
        assert len(report.shape_decisions) == 1 and report.shape_decisions[0].endswith("-> True")
    else:
        assert find_operations(gm)["attention"]


class _ListedTable(nn.Module):
    """Iterates over its input (fx makes it a leaf) and adds a tensor kept in a list, out of reach of
    the meta stand-ins (not a parameter, buffer or tensor attribute): the meta device cannot mix that
    CPU tensor in, fake tensors can."""

    def __init__(self):
        super().__init__()
        self.tables = [torch.arange(8.0)]

    def forward(self, x):
        return torch.stack([row + self.tables[0] for row in x])


class _WithListedTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.table = _ListedTable()

    def forward(self, x):
        return self.table(self.fc(x))


@pytest.mark.parametrize(
    ("model", "method", "reasons"),
    [
        (_WithListedTable(), "fake", ["meta: "]),
        (toy_models.GatedNet(), "forward", ["meta: ", "fake: "]),  # a leaf branches on tensor values
    ],
    ids=["tensor out of reach -> fake", "value branch -> forward"],
)
def test_a_node_the_meta_device_cannot_run_falls_back_and_the_report_says_why(model, method, reasons):
    x = torch.randn(2, 3, 8 if method == "fake" else 16)
    gm = trace(model.eval(), (x,), frontend="fx")
    report = trace_report(gm)
    assert report.opaque  # the leaf the fallback is about
    assert report.shapes_by == method
    assert [part.split(": ")[0] + ": " for part in report.shapes_fallback.split("; ")] == reasons
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert node_info(output).shape == tuple(model(x).shape)


def test_devices_the_graph_names_stay_on_the_meta_device():
    """torch.export writes device=cpu into factory calls and .to; a model may write x.to('cpu')."""

    class Pinned(nn.Module):
        def forward(self, x):
            return x.to("cpu") + torch.arange(x.shape[-1], device="cpu", dtype=x.dtype) + x.cpu()

    gm = trace(Pinned(), (torch.randn(2, 8),), frontend="fx")
    assert trace_report(gm).shapes_by == "meta", trace_report(gm).shapes_fallback


def test_a_llama_built_on_the_meta_device_is_traced_matched_and_rewritten_there():
    torch.manual_seed(0)
    real = _llama()
    with torch.device("meta"):
        meta = _llama()
    ids = _ids()  # on the CPU: trace moves it to the meta device
    on_cpu, on_meta = trace(real, (ids,)), trace(meta, (ids,))
    assert trace_report(on_meta).shapes_by == "meta"

    # torch.export's graph of a meta model may hold an extra no-op (contiguous): compare what rules read
    def seen(gm):
        operations = find_operations(gm)
        composites = [(i.scope, i.composite, i.shape) for i in map(node_info, gm.graph.nodes) if i.composite]
        return composites, {kind: [(r.scope, r.in_shape, r.out_shape) for r in operations[kind]] for kind in operations}

    assert seen(on_meta) == seen(on_cpu)
    assert sum(node_info(n).composite == "rms_norm" for n in on_meta.graph.nodes) == 5  # 2 x 2 + final
    rules = [load_rules("lora"), load_rules("dual_utuner")]
    counts = {found.rule.name: len(found.regions) for r in rules for found in match_rules(on_meta, r)}
    assert (counts["lora"], counts["mha"], counts["ffn"]) == (2 * 4, 2, 2)
    result = rewrite(on_meta, rules)
    tuners = [p for name, p in result.module.named_parameters() if name.startswith("utune.")]
    assert tuners and {p.device.type for p in tuners} == {"meta"}
    assert not any(p.device.type != "meta" for p in result.module.parameters())


def test_the_7b_llama_config_on_the_meta_device_fits_in_4_gb():
    found = trace_depth.run_llama_7b()
    print(
        f"\nLlama 7B on meta: {found['seconds']} s wall, {found['cpu_seconds']} s CPU, "
        f"peak RSS {found['peak_rss_mib']} MiB"
    )
    assert found["parameters"] > 6.7e9
    assert found["shapes_by"] == "meta"
    layers = trace_depth.LLAMA_7B["num_hidden_layers"]
    regions = found["regions"]
    assert (regions["lora"], regions["mha"], regions["ffn"]) == (4 * layers, layers, layers)
    assert found["tuners"] == 6 * layers
    assert found["tuner_devices"] == ["meta"]
    assert found["peak_rss_mib"] < 4096


class _SameShapesOtherSettings(nn.Module):
    """Ops and leaf modules that see the same input metadata but differ in a setting."""

    def __init__(self):
        super().__init__()
        self.flat_from_1, self.flat_from_2 = nn.Flatten(1), nn.Flatten(2)
        self.narrow, self.wide = nn.Linear(8, 4), nn.Linear(8, 6)

    def forward(self, x):
        parts = [self.flat_from_1(x), self.flat_from_2(x), x.sum(1), x.sum(2), self.narrow(x), self.wide(x)]
        return [*parts, torch.cat([x, x], 1), torch.cat([x, x], 2), x.half(), x.double()]


def test_the_memo_tells_settings_apart_and_runs_a_repeated_block_once():
    x = torch.randn(2, 3, 8)
    gm = trace(_SameShapesOtherSettings(), (x,))
    by_meta = [(node_info(n).shape, node_info(n).dtype) for n in gm.graph.nodes]
    annotate(gm, (x,), shapes_by="forward")
    assert by_meta == [(node_info(n).shape, node_info(n).dtype) for n in gm.graph.nodes]

    class Ops(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.count += func is not torch.ops.aten.empty_strided.default  # a memo hit's fresh output
            return func(*args, **(kwargs or {}))

    kernels = {}
    for depth in (2, 8):
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=depth).eval()
        image = torch.randn(1, 3, 32, 32)
        traced = trace(model, (image,))
        Ops.count = 0
        with Ops():
            propagate_shapes(traced, (image,))
        kernels[depth] = Ops.count
    assert kernels[8] - kernels[2] <= 6  # six more blocks: one more kernel each (unbind's views are not memoised)
