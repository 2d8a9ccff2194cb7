"""Front ends: fx with leaf fallback and shape branches, torch.export, errors."""

from collections import Counter

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from toy_models import DataDependentRoot, GatedNet, PadToMultiple, PerToken, transformer_encoder

from utune_fx.errors import UtuneError
from utune_fx.match import find_operations
from utune_fx.trace import node_info, trace, trace_report


def _kinds(gm):
    return Counter(node_info(n).op_kind for n in gm.graph.nodes)


def test_transformer_encoder_under_fx_keeps_each_mha_one_node_and_reports_it():
    model = transformer_encoder(layers=3).eval()
    x = torch.randn(2, 5, 32)
    gm = trace(model, x, frontend="fx")
    attentions = [f"layers.{i}.self_attn" for i in range(3)]
    report = trace_report(gm)
    assert report.frontend == "fx"
    assert [(o.path, o.class_name) for o in report.opaque] == [(a, "MultiheadAttention") for a in attentions]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    ops = find_operations(gm)
    assert [r.scope for r in ops["attention"]] == attentions
    assert [r.scope for r in ops["mlp"]] == [f"layers.{i}" for i in range(3)]
    assert [r.contains for r in ops["block"]] == [{"attention": 1, "mlp": 1}] * 3


def test_transformer_encoder_under_auto_is_seen_inside_by_torch_export():
    model = transformer_encoder(layers=3).eval()
    x = torch.randn(2, 5, 32)
    gm = trace(model, x)
    report = trace_report(gm)
    assert report.frontend == "export" and report.opaque == []
    assert report.fx_failure.startswith("3 module(s) opaque to torch.fx, first layers.0.self_attn: computes attention")
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the graph records MHA's Python path
    try:
        with torch.no_grad():
            assert torch.equal(gm(x), model(x))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    ops = find_operations(gm)
    assert [r.scope for r in ops["attention"]] == [f"layers.{i}.self_attn" for i in range(3)]
    assert [r.contains for r in ops["block"]] == [{"attention": 1, "mlp": 1}] * 3
    # the packed q/k/v projection and out_proj are linears; out_proj's node is scoped to out_proj
    linears = [n for n in gm.graph.nodes if node_info(n).op_kind == "linear"]
    weights = {str(n.args[1].target): node_info(n).scope for n in linears}
    for i in range(3):
        assert weights[f"layers.{i}.self_attn.in_proj_weight"] == f"layers.{i}.self_attn"
        assert weights[f"layers.{i}.self_attn.out_proj.weight"] == f"layers.{i}.self_attn.out_proj"
        assert weights[f"layers.{i}.linear1.weight"] == f"layers.{i}.linear1"


def window_attention(x, weight):
    """Attention in a function torch.fx keeps whole (wrapped below)."""
    q, k, v = F.linear(x, weight).chunk(3, dim=-1)
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v


def doubled(x):
    return x * 2


torch.fx.wrap("window_attention")
torch.fx.wrap("doubled")


class Wrapped(nn.Module):
    def __init__(self, attend: bool):
        super().__init__()
        self.attend = attend
        self.qkv_weight = nn.Parameter(torch.randn(24, 8) / 8**0.5)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):  # the names, not references: torch.fx.wrap patches them while tracing
        return x + self.proj(window_attention(x, self.qkv_weight) if self.attend else doubled(x))


def test_a_wrapped_function_that_computes_attention_sends_auto_to_torch_export():
    x = torch.randn(2, 5, 8)
    model = Wrapped(attend=True).eval()
    by_fx = trace_report(trace(model, x, frontend="fx"))
    assert [(o.path, o.class_name) for o in by_fx.opaque] == [("", "Wrapped")]
    assert "window_attention()" in by_fx.opaque[0].reason
    gm = trace(model, x)
    assert trace_report(gm).frontend == "export" and "window_attention()" in trace_report(gm).fx_failure
    assert len(find_operations(gm)["attention"]) == 1
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-6)
    plain = Wrapped(attend=False).eval()  # a wrapped function without attention hides nothing
    report = trace_report(trace(plain, x))
    assert report.frontend == "fx" and report.opaque == []


def test_data_dependent_submodule_becomes_an_opaque_leaf():
    model = GatedNet().eval()
    x = torch.randn(4, 16)
    gm = trace(model, x)
    report = trace_report(gm)
    assert report.frontend == "fx"
    assert [(o.path, o.class_name) for o in report.opaque] == [("gate", "Gate")]
    assert "control flow" in report.opaque[0].reason and "toy_models.py:" in report.opaque[0].reason
    gate = next(n for n in gm.graph.nodes if n.target == "gate")
    assert node_info(gate).op_kind == "opaque"
    assert _kinds(gm)["linear"] == 2  # inp and out are still seen
    with torch.no_grad():
        for sample in (x.abs(), -x.abs()):  # both branches run: the leaf executes real code
            assert torch.equal(gm(sample), model(sample))


def test_shape_branch_is_specialised_not_leafed():
    model = PadToMultiple().eval()
    x = torch.randn(2, 6, 8)
    gm = trace(model, x)
    report = trace_report(gm)
    assert report.opaque == []
    assert len(report.shape_decisions) == 1 and report.shape_decisions[0].startswith("toy_models.py:")
    assert report.shape_decisions[0].endswith("-> True")
    assert _kinds(gm)["pad"] == 1
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
        y = torch.randn(5, 6, 8)  # the batch dimension stays free
        assert torch.equal(gm(y), model(y))


def test_export_front_end_takes_over_when_fx_cannot_trace_the_model_itself():
    model = PerToken().eval()
    x = torch.randn(2, 3, 8)
    gm = trace(model, x)
    report = trace_report(gm)
    assert report.frontend == "export"
    assert "Proxy" in report.fx_failure
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    linears = [n for n in gm.graph.nodes if node_info(n).op_kind == "linear"]
    assert len(linears) == 3 and {node_info(n).scope for n in linears} == {"fc"}
    ops = find_operations(gm)
    assert (len(ops["residual"]), len(ops["norm"]), len(ops["attention"])) == (1, 1, 0)


def test_export_front_end_gives_the_same_kinds_and_operations_as_fx():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    by_fx, by_export = trace(model, x, frontend="fx"), trace(model, x, frontend="export")
    assert trace_report(by_export).frontend == "export"
    with torch.no_grad():
        assert torch.equal(by_export(x), model(x))
    weighted = ("linear", "conv", "norm", "attention", "add")
    assert {k: _kinds(by_fx)[k] for k in weighted} == {k: _kinds(by_export)[k] for k in weighted}

    def summary(gm):
        return sorted((kind, r.scope, r.out_shape) for kind, regions in find_operations(gm).items() for r in regions)

    assert summary(by_fx) == summary(by_export)


def test_hugging_face_bert_goes_through_torch_export():
    pytest.importorskip("transformers")
    from toy_models import BertLastHidden, small_bert

    model = small_bert()
    ids = torch.randint(0, 64, (2, 8))
    wrapped = BertLastHidden(model).eval()
    gm = trace(wrapped, ids)
    assert trace_report(gm).frontend == "export"
    with torch.no_grad():
        assert torch.equal(gm(ids), wrapped(ids))
    ops = find_operations(gm)
    assert [r.scope for r in ops["attention"]] == [f"bert.encoder.layer.{i}.attention" for i in range(2)]
    assert len(ops["attention"][0].captures["qkv"]) == 3  # separate query, key and value projections
    assert len(ops["mlp"]) == 2 and len(ops["ffn"]) == 2


def test_untraceable_model_is_one_clear_error():
    with pytest.raises(UtuneError) as caught:
        trace(DataDependentRoot(), torch.randn(2, 8), name="toy:DataDependentRoot")
    message = str(caught.value)
    assert message.startswith("toy:DataDependentRoot cannot be traced (torch.fx: TraceError")
    assert "torch.export:" in message and "\n" not in message


def test_forcing_fx_on_a_model_only_export_can_trace_says_what_to_do():
    with pytest.raises(UtuneError, match="cannot be traced by torch.fx .*try --frontend export"):
        trace(PerToken(), torch.randn(2, 3, 8), frontend="fx")


def test_inputs_the_model_rejects_are_reported_as_such():
    with pytest.raises(UtuneError, match=r"rejects example input\(s\) of shape 2x3x7 .*pass --input-shape"):
        trace(nn.Linear(8, 4), torch.randn(2, 3, 7), name="lin")


def test_missing_required_input_is_reported():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(UtuneError, match="forward\\(\\) needs input 'y'.*one --input-shape per input"):
        trace(TwoInputs(), torch.randn(2, 3))


def test_annotations_record_dtypes():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU()).to(torch.bfloat16).eval()
    gm = trace(model, torch.randn(2, 8, dtype=torch.bfloat16))
    assert {node_info(n).dtype for n in gm.graph.nodes if n.op == "call_module"} == {"bfloat16"}


class _MaskedSoftmax(torch.autograd.Function):
    """DeBERTa's XSoftmax: softmax, then zero the masked places in place; its own backward."""

    @staticmethod
    def forward(ctx, scores, mask):
        probs = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), -1)
        probs.masked_fill_(~mask, 0)
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad):
        (probs,) = ctx.saved_tensors
        return probs * (grad - (grad * probs).sum(-1, keepdim=True)), None


class _MaskedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        mask = torch.ones(x.shape[-2], x.shape[-2], dtype=torch.bool).tril()
        scores = self.proj(x) @ x.transpose(-1, -2)
        out = _MaskedSoftmax.apply(scores, mask) @ x
        edge = out * 1  # an in-place write through a view must stay in place
        edge[:, 0].mul_(2)
        return edge


def _gradients(module, x):
    module.zero_grad()
    module(x).square().sum().backward()
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def test_in_place_ops_on_temporaries_are_written_out_of_place_so_the_graph_trains():
    torch.manual_seed(0)
    model = _MaskedAttention().double()
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    gm = trace(model, x, frontend="export")
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "aten.masked_fill.Scalar" in targets and "aten.masked_fill_.Scalar" not in targets
    assert "aten.mul_.Tensor" in targets  # the view's write is left alone
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-12)
    expected = _gradients(model, x)  # eager, through the Function's own backward
    for name, grad in _gradients(gm, x).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-12)
