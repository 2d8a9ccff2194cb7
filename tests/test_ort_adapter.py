"""Tuners as ONNX Runtime adapters (.onnx_adapter, RunOptions.add_active_adapter): one exported graph
whose tuner inputs default to the base model, one adapter file per task; each run is checked against
eager PyTorch (the task's tuned model, and the untouched timm model for the run without an adapter),
and adapters of another model are refused in one line."""

import copy
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import utune_fx  # noqa: F401  (before timm)
from utune_fx.cli import main
from utune_fx.errors import UtuneError
from utune_fx.export import adapter_path_for, export_adapter, export_onnx, load_adapter, tuner_feeds
from utune_fx.match import load_rules
from utune_fx.rewrite.artifact import TunedSource, build_tuned, save_tuned

RULES = Path(__file__).resolve().parents[1] / "rules"
VIT = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=1&num_classes=10"
ATOL = 1e-4  # float32 on logits of magnitude ~1.5; measured up to 1.8e-6 (ViT depth 2, both exporters)
FAST = "torchscript"  # 4x faster here than dynamo, which tests/test_export.py and test_deploy_cli.py run


@pytest.fixture(scope="module")
def lora():
    """The tuned ViT as the rewrite makes it (its tuners the identity) and the timm model it came from."""
    rules = [load_rules(RULES / "lora.yaml")]
    result = build_tuned(TunedSource(VIT, [], "auto"), rules)
    return result, rules, copy.deepcopy(result.base_model).eval()


def _task(result, seed):
    """``result``'s tuned model with every trainable tensor drawn anew (LoRA's B included): a task."""
    task = copy.deepcopy(result.module)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in task.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return task.eval()


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ONNX Runtime warns once per overridable initializer: the point here
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


_LOADED = []  # RunOptions keeps a pointer to the adapter, not the object: something else must


def _active(adapter_file, model):
    options = ort.RunOptions()
    _LOADED.append(load_adapter(adapter_file, model))
    options.add_active_adapter(_LOADED[-1])
    return options


def _one_line(call, match):
    with pytest.raises(UtuneError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)


def test_one_graph_two_adapters_match_pytorch_and_no_adapter_is_the_base_model(tmp_path, lora):
    result, _, base = lora
    names = [name for name, p in result.module.named_parameters() if p.requires_grad]
    initial = {name: p.detach().clone() for name, p in result.module.named_parameters() if p.requires_grad}
    task_a, task_b = _task(result, 1), _task(result, 2)
    model = tmp_path / "shared.onnx"
    exported = export_onnx(
        task_a, result.example_inputs, model, exporter=FAST, tuner_names=names, tuner_defaults=initial
    )
    assert exported.parity.passed and exported.defaults_parity.passed
    adapters = {"a": tmp_path / "a.onnx_adapter", "b": tmp_path / "b.onnx_adapter"}
    for key, task in (("a", task_a), ("b", task_b)):
        written = export_adapter(task, result.example_inputs, adapters[key], model)
        assert (written.tensors, written.parity.passed) == (len(names), True)
        assert max(c.max_abs_error for c in written.parity.checks) < ATOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx_adapter", "b.onnx_adapter", "shared.onnx"]

    session = _session(model)
    assert [i.name for i in session.get_inputs()] == ["x"]  # the tuner inputs have defaults
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    outputs = {}
    with torch.no_grad():
        for key, task in (("a", task_a), ("b", task_b)):
            outputs[key] = session.run(None, {"x": x.numpy()}, _active(adapters[key], model))[0]
            np.testing.assert_allclose(outputs[key], task(x).numpy(), rtol=0, atol=ATOL)
        outputs["base"] = session.run(None, {"x": x.numpy()})[0]  # no adapter, no feeds
        np.testing.assert_allclose(outputs["base"], base(x).numpy(), rtol=0, atol=ATOL)
    assert min(np.abs(outputs[p] - outputs[q]).max() for p, q in [("a", "b"), ("a", "base"), ("b", "base")]) > 1e-2
    # an adapter's tensor wins over a feed of the same name (ONNX Runtime 1.31)
    feeds_a = {name: task_a.get_parameter(name).detach().numpy() for name in names}
    both = session.run(None, {"x": x.numpy(), **feeds_a}, _active(adapters["b"], model))[0]
    np.testing.assert_allclose(both, outputs["b"], rtol=0, atol=1e-6)

    # a task on other base weights: the adapter is written, fails parity, and is not put in place
    with torch.no_grad():
        frozen = next(p for p in task_b.parameters() if not p.requires_grad)
        frozen.add_(torch.randn(frozen.shape, generator=torch.Generator().manual_seed(0)))  # not a constant: norms
    _one_line(
        lambda: export_adapter(task_b, result.example_inputs, tmp_path / "c.onnx_adapter", model),
        r"c\.onnx_adapter: with the adapter active, .*differs from PyTorch at batch 1: .*same base model",
    )
    assert not (tmp_path / "c.onnx_adapter").exists() and not (tmp_path / ".c.onnx_adapter.tmp").exists()

    # adapters of another model, and files that are no adapter, are refused in one line
    other = ort.AdapterFormat()
    other.set_parameters({"blocks.0.attn.qkv.lora_B": ort.OrtValue.ortvalue_from_numpy(np.zeros((2, 2), np.float32))})
    other.export_adapter(str(tmp_path / "other.onnx_adapter"))
    _one_line(lambda: load_adapter(tmp_path / "other.onnx_adapter", model), r"tuner tensor \S+ is missing")
    fewer = ort.AdapterFormat()
    fewer.set_parameters({names[0]: ort.OrtValue.ortvalue_from_numpy(np.zeros((2, 2), np.float32))})
    fewer.export_adapter(str(tmp_path / "fewer.onnx_adapter"))
    _one_line(lambda: load_adapter(tmp_path / "fewer.onnx_adapter", model), r"is missing \(\d+ of \d+ missing\)")
    (tmp_path / "junk.onnx_adapter").write_bytes(b"\x00" * 64)
    _one_line(lambda: load_adapter(tmp_path / "junk.onnx_adapter", model), r"not an ONNX Runtime adapter file")
    _one_line(lambda: load_adapter(tmp_path / "none.onnx_adapter", model), r"no such adapter file")
    _one_line(lambda: export_adapter(task_a, result.example_inputs, tmp_path / "a.bin", model), r"ends in")


def test_cli_writes_the_adapter_beside_the_model_and_one_for_another_task(tmp_path, capsys, lora):
    result, rules, base = lora
    tasks = {"a": _task(result, 1), "b": _task(result, 2)}
    for key, module in tasks.items():
        task = copy.copy(result)  # the fixture's result stays as the rewrite made it
        task.module = module
        save_tuned(task, rules, result.source, tmp_path / key)
    model = tmp_path / "shared.onnx"
    assert main(["export", str(tmp_path / "a"), "-o", str(model), "--tuners-as-inputs", "--exporter", FAST]) == 0
    text = capsys.readouterr().out
    assert adapter_path_for(model) == tmp_path / "shared.onnx_adapter" and adapter_path_for(model).is_file()
    assert "tuner inputs unfed (the base model): ONNX Runtime" in text and "with it active: ONNX Runtime" in text
    task_b = tmp_path / "b.onnx_adapter"
    assert main(["export", str(tmp_path / "b"), "--adapter-for", str(model), "-o", str(task_b), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(task_b) and all(c["passed"] and c["max_abs_error"] < ATOL for c in report["parity"])

    session = _session(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for key, adapter in (("a", adapter_path_for(model)), ("b", task_b)):
            got = session.run(None, {"x": x.numpy()}, _active(adapter, model))[0]
            np.testing.assert_allclose(got, tasks[key](x).numpy(), rtol=0, atol=ATOL)
            fed = session.run(None, {"x": x.numpy(), **tuner_feeds(tmp_path / key, model)})[0]
            np.testing.assert_allclose(fed, got, rtol=0, atol=1e-6)  # the feeds still serve too
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], base(x).numpy(), rtol=0, atol=ATOL)

    # another task's rules: refused in one line, exit 2, nothing written
    other = build_tuned(TunedSource(VIT, [], "auto"), [load_rules(RULES / "linear_probe.yaml")])
    save_tuned(other, [load_rules(RULES / "linear_probe.yaml")], other.source, tmp_path / "probe")
    for argv in (
        ["export", str(tmp_path / "probe"), "--adapter-for", str(model), "-o", str(tmp_path / "p.onnx_adapter")],
        ["export", str(tmp_path / "b"), "--adapter-for", str(model), "-o", str(tmp_path / "p.onnx")],
        ["export", str(tmp_path / "b"), "--adapter-for", str(model), "-o", str(tmp_path / "p.onnx_adapter"), "--fold"],
    ):
        assert main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and error, error
    assert not list(tmp_path.glob("p.*"))
