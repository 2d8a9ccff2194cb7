"""ONNX export of tuned models, checked with ONNX Runtime: parity with tuners away from identity at two
batch sizes on one file (ViT, Swin, ResNet), one file serving two tasks through tuner inputs, external
data, the exporter fallback, and one-line errors (bad tuner files, ops without a translation, parity)."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import safetensors.torch
import torch
from torch import fx, nn
from torch.nn import functional as F

import utune_fx  # noqa: F401  (before timm)
from utune_fx.errors import UtuneError
from utune_fx.export import (
    TOLERANCES,
    export_onnx,
    onnx_tuner_inputs,
    tuner_feeds,
    verify_onnx,
)
from utune_fx.match import load_rules
from utune_fx.rewrite.artifact import TENSORS, TunedSource, build_tuned, save_tuned

RULES = Path(__file__).resolve().parents[1] / "rules"
VIT = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2"
SWIN = "timm:swin_tiny_patch4_window7_224?img_size=56&embed_dim=24&depths=[1,1]&num_heads=[1,2]"
RESNET = "timm:resnet10t?num_classes=10"


def _tuned(spec, rule_file, shapes=(), seed=1):
    """A tuned model whose tuners really change the output (they start as identity)."""
    rules = [load_rules(RULES / f"{rule_file}.yaml")]
    result = build_tuned(TunedSource(spec, list(shapes), "auto"), rules)
    x = result.example_inputs
    with torch.no_grad():
        identity = result.module(*x)
        torch.manual_seed(seed)
        for parameter in result.module.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.05)
        assert (result.module(*x) - identity).abs().max() > 1e-3
    return result, rules


def _trainable(module):
    return [name for name, p in module.named_parameters() if p.requires_grad]


def _run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _one_line_error(call, match):
    with pytest.raises(UtuneError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize(
    "spec,rule_file,shapes",
    [
        (VIT, "dual_utuner", ()),
        (VIT, "prefix", ()),
        (VIT, "vpt_shallow", ()),  # prompts replayed through the blocks: _prompt_attention nodes
        (SWIN, "dual_utuner", ()),
        (RESNET, "utuner_block", ("2,3,32,32",)),
    ],
)
def test_tuned_models_match_onnx_runtime_at_two_batch_sizes(tmp_path, spec, rule_file, shapes):
    result, _ = _tuned(spec, rule_file, shapes)
    path = tmp_path / "model.onnx"
    exported = export_onnx(result.module, result.example_inputs, path)
    assert (exported.path, exported.exporter, exported.opset, exported.fallback_reason) == (path, "dynamo", 18, None)
    assert (exported.input_names, exported.output_names, exported.tuner_inputs) == (["x"], ["output"], [])
    assert not exported.external_data and exported.data_path is None and exported.size_bytes == path.stat().st_size
    assert [c.batch_size for c in exported.parity.checks] == [1, 4] and exported.parity.passed
    assert all(c.max_abs_error < 1e-5 and c.rtol == TOLERANCES[torch.float32].rtol for c in exported.parity.checks)
    graph = onnx.load(str(path)).graph
    assert all(v.type.tensor_type.shape.dim[0].dim_param for v in [*graph.input, *graph.output])
    x = torch.randn(3, *result.example_inputs[0].shape[1:])  # a third batch size, outside verify_onnx
    with torch.no_grad():
        np.testing.assert_allclose(_run(path, {"x": x.numpy()})[0], result.module(x).numpy(), rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no staging left behind


def test_one_onnx_file_serves_two_tasks_through_tuner_inputs(tmp_path):
    task_a, rules = _tuned(VIT, "dual_utuner", seed=1)
    task_b, _ = _tuned(VIT, "dual_utuner", seed=2)
    save_tuned(task_a, rules, task_a.source, tmp_path / "a")
    save_tuned(task_b, rules, task_b.source, tmp_path / "b")
    names = _trainable(task_a.module)
    path = tmp_path / "shared.onnx"
    exported = export_onnx(task_a.module, task_a.example_inputs, path, tuner_names=names)
    assert exported.tuner_inputs == names and exported.input_names == ["x", *names]
    assert exported.defaults_parity.passed  # unfed: the defaults, here the module's own values
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["x", *names]
    initializers = [i.name for i in graph.initializer]
    tuner_like = sorted(i for i in initializers if any(i.endswith(name) for name in names))
    assert tuner_like == sorted(names)  # only each input's default, under the input's name: no frozen copy
    assert list(onnx_tuner_inputs(path)) == names
    assert onnx_tuner_inputs(path)["utune.mha.0.down.weight"] == ((8, 192), np.float32)

    feeds_a, feeds_b = tuner_feeds(tmp_path / "a", path), tuner_feeds(tmp_path / "b" / TENSORS, path)
    assert verify_onnx(path, task_a.module, task_a.example_inputs, tuner_feeds=feeds_a).passed
    assert verify_onnx(path, task_b.module, task_b.example_inputs, tuner_feeds=feeds_b).passed
    x = torch.randn(2, 3, 32, 32).numpy()
    output_a, output_b = _run(path, {"x": x, **feeds_a})[0], _run(path, {"x": x, **feeds_b})[0]
    assert np.abs(output_a - output_b).max() > 1e-2  # the two tasks really differ
    message = _one_line_error(
        lambda: verify_onnx(path, task_a.module, task_a.example_inputs, tuner_feeds=feeds_b),
        r"differs from PyTorch at batch 1: max abs error \d\.\d\de[+-]\d\d, relative error",
    )
    assert "float32 tolerance: rtol 1e-04, atol 1e-05" in message
    # unfed, the tuner inputs hold their defaults (initializers): here the exported module's own values
    assert [i.name for i in ort.InferenceSession(str(path)).get_overridable_initializers()] == names
    assert verify_onnx(path, task_a.module, task_a.example_inputs).passed
    _one_line_error(
        lambda: verify_onnx(path, task_b.module, task_b.example_inputs),
        r"differs from PyTorch at batch 1",
    )

    wrong = {name: torch.from_numpy(array) for name, array in feeds_a.items()}
    wrong["utune.ffn.1.up.weight"] = torch.zeros(3, 8)
    safetensors.torch.save_file(wrong, str(tmp_path / "wrong.safetensors"))
    _one_line_error(
        lambda: tuner_feeds(tmp_path / "wrong.safetensors", path),
        r"tuner tensor utune\.ffn\.1\.up\.weight has shape \[3, 8\], the model expects \[192, 8\]",
    )


def test_tuner_files_that_do_not_fit_name_the_tensor(tmp_path):
    file = tmp_path / "tuners.safetensors"
    safetensors.torch.save_file(
        {"utune.a.0.down.weight": torch.zeros(4, 16), "utune.a.0.up.weight": torch.zeros(16, 4)}, str(file)
    )
    assert list(tuner_feeds(tmp_path, ["utune.a.0.up.weight", "utune.a.0.down.weight"])) == [
        "utune.a.0.up.weight",
        "utune.a.0.down.weight",
    ]
    _one_line_error(
        lambda: tuner_feeds(file, {"utune.a.0.down.weight": (8, 16), "utune.a.0.up.weight": (16, 4)}),
        r"utune\.a\.0\.down\.weight has shape \[4, 16\], the model expects \[8, 16\]",
    )
    _one_line_error(
        lambda: tuner_feeds(file, ["utune.a.0.down.weight", "utune.a.0.up.weight", "utune.a.1.up.weight"]),
        r"tuner tensor utune\.a\.1\.up\.weight is missing",
    )
    _one_line_error(
        lambda: tuner_feeds(file, ["utune.a.0.down.weight"]),
        r"tensor utune\.a\.0\.up\.weight is not a tuner input of the model",
    )
    torch.save({"w": torch.zeros(1)}, tmp_path / "tuners.pt")
    _one_line_error(lambda: tuner_feeds(tmp_path / "tuners.pt", ["w"]), r"read from safetensors only")
    _one_line_error(lambda: tuner_feeds(tmp_path / "elsewhere", ["w"]), r"not a tuned artifact directory")


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_large_models_keep_their_weights_in_one_data_file(tmp_path, exporter):
    model, x = _Tiny(), torch.randn(2, 16)
    path = tmp_path / "tiny.onnx"
    exported = export_onnx(model, (x,), path, exporter=exporter, external_data_threshold=1024)
    data = tmp_path / "tiny.onnx.data"
    assert exported.external_data and exported.data_path == data and exported.exporter == exporter
    assert exported.size_bytes == path.stat().st_size + data.stat().st_size and data.stat().st_size >= 32 * 16 * 4
    assert data.stat().st_mode & 0o044  # an ordinary file, not the private one onnx writes
    weights = onnx.load(str(path), load_external_data=False).graph.initializer
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    onnx.checker.check_model(str(path))
    batch = torch.randn(5, 16)
    with torch.no_grad():
        np.testing.assert_allclose(_run(path, {"x": batch.numpy()})[0], model(batch).numpy(), rtol=1e-4, atol=1e-5)
    exported = export_onnx(model, (x,), path, exporter=exporter)  # small again: no stale data file left
    assert not exported.external_data and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


class _Branches(nn.Module):
    """Python control flow on a tensor's value: torch.export refuses it, the TorchScript tracer takes
    the branch the example inputs take."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        y = self.linear(x)
        return y.relu() if y.sum() > -1e9 else -y


def test_auto_falls_back_to_torchscript_and_says_why(tmp_path):
    exported = export_onnx(_Branches(), (torch.randn(2, 8),), tmp_path / "branches.onnx")
    assert exported.exporter == "torchscript" and exported.parity.passed
    assert exported.fallback_reason.startswith("dynamo: ") and "data-dependent" in exported.fallback_reason


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 8), nn.Linear(8, 3)

    def forward(self, ids, mask):
        return self.head((self.embed(ids) * mask.unsqueeze(-1)).sum(1)), mask.sum(1)


def test_integer_inputs_stay_in_the_examples_range_and_share_the_batch(tmp_path):
    ids, mask = torch.randint(0, 10, (2, 5)), torch.ones(2, 5)
    exported = export_onnx(_Tokens(), (ids, mask), tmp_path / "tokens.onnx", batch_sizes=(1, 3))
    assert exported.input_names == ["ids", "mask"] and exported.output_names == ["output_0", "output_1"]
    assert exported.parity.passed
    graph = onnx.load(str(tmp_path / "tokens.onnx")).graph
    assert [i.type.tensor_type.shape.dim[0].dim_param for i in graph.input] == ["batch", "batch"]


@torch.library.custom_op("utune_test::wobble", mutates_args=())
def wobble(x: torch.Tensor) -> torch.Tensor:
    return x.sin() * 2


@wobble.register_fake
def _(x):
    return torch.empty_like(x)


class _Wobbly(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return torch.ops.utune_test.wobble(self.linear(x)).relu()


def test_an_op_without_an_onnx_translation_is_named_in_one_line(tmp_path):
    gm = fx.symbolic_trace(_Wobbly())
    message = _one_line_error(
        lambda: export_onnx(gm, (torch.randn(2, 4),), tmp_path / "w.onnx"),
        r"cannot export to ONNX: utune_test::wobble \(graph node wobble\) has no ONNX "
        r"translation in opset 18 \(dynamo: .*; torchscript: .*\)",
    )
    assert "No ONNX function found" in message and "unrecognized namespace" in message
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging left


class _Clippable(nn.Module):
    """A linear whose input and output are clamped to bounds held in buffers (Gemma 4's vision tower)."""

    def __init__(self, bound):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.register_buffer("low", torch.tensor(-bound))
        self.register_buffer("high", torch.tensor(bound))

    def forward(self, x):
        return self.linear(x.clamp(self.low, self.high)).clamp(self.low, self.high)


class _ClampedNorms(nn.Module):
    """RMSNorm with and without weight, and three clamps of one tensor with different bounds: onnxscript's
    Min/Max -> Clip rewrite names every pair of bounds after that tensor, so the names collide."""

    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(8, eps=1e-6)
        self.q, self.k, self.v = _Clippable(0.5), _Clippable(1.0), _Clippable(float("inf"))

    def forward(self, x):
        x = self.norm(x * 2)
        return F.rms_norm(self.q(x) + self.k(x) * self.v(x), (8,))


def test_rms_norm_and_clamps_sharing_an_input_export_with_dynamo(tmp_path):
    torch.manual_seed(0)
    model, path = _ClampedNorms(), tmp_path / "clamped.onnx"
    exported = export_onnx(model, (torch.randn(2, 5, 8),), path)
    assert (exported.exporter, exported.fallback_reason) == ("dynamo", None) and exported.parity.passed
    graph = onnx.load(str(path)).graph
    clips = [node for node in graph.node if node.op_type == "Clip"]
    bounds = {t.name: float(onnx.numpy_helper.to_array(t)) for t in graph.initializer if not t.dims}
    assert len(clips) == 6 and all(name in bounds for clip in clips for name in clip.input[1:])
    assert {bounds[clip.input[2]] for clip in clips} == {0.5, 1.0, float("inf")}
    x = torch.randn(3, 5, 8) * 4  # beyond the bounds: every clamp matters
    with torch.no_grad():
        np.testing.assert_allclose(_run(path, {"x": x.numpy()})[0], model(x).numpy(), rtol=1e-4, atol=1e-5)


class _WobblyBranches(_Wobbly):
    def forward(self, x):
        y = torch.ops.utune_test.wobble(self.linear(x))
        return y if y.sum() > -1e9 else -y


def test_the_op_is_charged_to_the_exporter_that_named_it(tmp_path):
    message = _one_line_error(
        lambda: export_onnx(_WobblyBranches(), (torch.randn(2, 4),), tmp_path / "w.onnx"),
        r"cannot export to ONNX: utune_test::wobble has no ONNX translation in the "
        r"torchscript exporter in opset 18 \(dynamo: .*; torchscript: .*\)",
    )
    assert "data-dependent" in message


def test_a_parity_failure_is_one_line_with_the_numbers(tmp_path):
    torch.manual_seed(0)
    model, other = _Tiny(), _Tiny()
    path = tmp_path / "tiny.onnx"
    export_onnx(model, (torch.randn(2, 16),), path, exporter="torchscript")
    _one_line_error(
        lambda: verify_onnx(path, other, (torch.randn(2, 16),)),
        r"tiny\.onnx: ONNX Runtime \(CPUExecutionProvider\) differs from PyTorch at batch 1: max abs error",
    )


class _FixedBatch(_Tiny):
    def forward(self, x):
        return self.net(x).reshape(2, 2, 2)


def test_a_module_that_takes_one_batch_size_is_reported_as_such(tmp_path):
    _one_line_error(
        lambda: export_onnx(_FixedBatch(), (torch.randn(2, 16),), tmp_path / "fixed.onnx"),
        r"^the PyTorch module fails at batch 1 \(RuntimeError: shape '\[2, 2, 2\]' is invalid",
    )
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_one_line_errors(tmp_path):
    model, x = _Tiny(), (torch.randn(2, 16),)
    _one_line_error(
        lambda: export_onnx(model, x, tmp_path / "m.onnx", tuner_names=["net.9.weight"]),
        r"tuner name net\.9\.weight is not a parameter of the model",
    )
    _one_line_error(lambda: export_onnx(model, x, tmp_path / "m.onnx", exporter="tflite"), r"unknown exporter 'tflite'")
    _one_line_error(
        lambda: onnx_tuner_inputs(export_onnx(model, x, tmp_path / "m.onnx").path), r"exported without tuner inputs"
    )


class _ZeroPaddedMaxPool(nn.Module):
    """Hugging Face BiT's stem: a conv, zero padding, a 3 x 3 max pool (ONNX Runtime's PadFusion
    would fold the zeros into MaxPool's -inf padding)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return F.max_pool2d(F.pad(self.conv(x), (1, 1, 1, 1), value=0.0), 3, 2)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_zero_padding_before_a_max_pool_keeps_pytorch_values_in_onnx_runtime(tmp_path, exporter):
    torch.manual_seed(0)
    model, path = _ZeroPaddedMaxPool().eval(), tmp_path / "pool.onnx"
    with torch.no_grad():
        model.conv.bias.fill_(-3.0)  # windows of negative values only: the padded zeros win in PyTorch
    exported = export_onnx(model, (torch.randn(2, 3, 16, 16),), path, exporter=exporter)
    assert exported.parity.passed
    kinds = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "Pad" not in kinds and {"MaxPool", "Max"} <= set(kinds)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():  # ONNX Runtime with every optimisation on, as deployed
        np.testing.assert_allclose(_run(path, {"x": x.numpy()})[0], model(x).numpy(), rtol=1e-4, atol=1e-5)
