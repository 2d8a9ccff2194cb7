"""cli.py fold / export / bench: folded artifacts, ONNX Runtime parity of folded models, one-line errors."""

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import safetensors.torch
import timm
import torch

from utune_fx.cli import main
from utune_fx.export import export_onnx
from utune_fx.fold import FOLDED, fold
from utune_fx.fold.artifact import FOLD_REPORT, FOLDED_TENSORS, load_folded
from utune_fx.match import load_rules
from utune_fx.rewrite.artifact import MANIFEST, TENSORS, TunedSource, build_tuned, load_tuned, save_tuned

RULES = Path(__file__).resolve().parents[1] / "rules"
VIT = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2"
SWIN = "timm:swin_tiny_patch4_window7_224?img_size=56&embed_dim=24&depths=[1,1]&num_heads=[1,2]"
RESNET = "timm:resnet10t?num_classes=10"
LORA_ONLY = (
    "version: 1\nrules:\n  - {name: lora, match: {any_of: [{node: {kind: linear}, within: attention}, "
    "{node: {kind: conv}, within: block}]}, tuner: lora, settings: {rank: 4}}\n"
)


def _artifact(tmp_path, spec, rules_text=LORA_ONLY, seed=1, name="tuned"):
    """A tuned artifact whose tuners are away from identity (as after training)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(rules_text)
    rules = [load_rules(path)]
    result = build_tuned(TunedSource(spec, [], "auto"), rules)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in result.module.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.05)
    return save_tuned(result, rules, result.source, tmp_path / name)


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())}


def test_fold_writes_an_artifact_and_leaves_the_tuned_one_alone(tmp_path, capsys):
    tuned = _artifact(tmp_path, VIT)
    before = _digest(tuned)
    assert main(["fold", str(tuned), "-o", str(tmp_path / "folded")]) == 0
    text = capsys.readouterr().out
    assert "4 folded" in text and "utune.lora.{0..3}" in text and "blocks.{0,1}.attn.qkv" in text
    assert "relative difference" in text
    assert _digest(tuned) == before
    report = json.loads((tmp_path / "folded" / FOLD_REPORT).read_text())
    assert [e["status"] for e in report["entries"]] == [FOLDED] * 4 and report["relative_difference"] < 1e-5
    result, folded = load_folded(tmp_path / "folded")
    x = result.example_inputs
    with torch.no_grad():
        assert torch.allclose(folded.module(*x), load_tuned(tuned).module(*x), rtol=1e-5, atol=1e-6)
    # a LoRA-only fold is the plain model: its weights load into timm's own class
    plain = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    plain.load_state_dict(safetensors.torch.load_file(str(tmp_path / "folded" / FOLDED_TENSORS)))
    with torch.no_grad():
        assert torch.allclose(plain(*x), folded.module(*x), atol=1e-6)


@pytest.mark.parametrize("spec,rule_file", [(VIT, "dual_utuner"), (SWIN, "lora"), (RESNET, "lora"), (VIT, "vpt_deep")])
def test_folded_models_match_onnx_runtime(tmp_path, spec, rule_file):
    tuned = _artifact(tmp_path, spec, (RULES / f"{rule_file}.yaml").read_text())
    result = load_tuned(tuned)
    folded = fold(result.module, result.summaries)
    exported = export_onnx(folded.module, result.example_inputs, tmp_path / "model.onnx", batch_sizes=(1, 3))
    assert exported.parity.passed and [c.batch_size for c in exported.parity.checks] == [1, 3]
    x = torch.randn(2, *result.example_inputs[0].shape[1:])
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(
            session.run(None, {session.get_inputs()[0].name: x.numpy()})[0],
            result.module(x).numpy(),
            rtol=1e-4,
            atol=1e-5,
        )  # against the unfolded model


def test_export_prints_parity_and_refuses_tuner_inputs_on_a_folded_model(tmp_path, capsys):
    tuned = _artifact(tmp_path, VIT)
    assert main(["export", str(tuned), "--fold", "-o", str(tmp_path / "m.onnx"), "--opset", "17"]) == 0
    text = capsys.readouterr().out
    assert "folded (4 tuners merged, 0 kept)" in text and "opset 17" in text
    assert text.count("ONNX Runtime (CPUExecutionProvider) vs PyTorch") == 2 and "FAILED" not in text
    assert main(["fold", str(tuned), "-o", str(tmp_path / "folded")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "folded"), "-o", str(tmp_path / "x.onnx"), "--tuners-as-inputs"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--tuners-as-inputs" in error and not (tmp_path / "x.onnx").exists()


def test_export_json_lists_tuner_inputs(tmp_path, capsys):
    tuned = _artifact(tmp_path, VIT, (RULES / "dual_utuner.yaml").read_text())
    assert main(["export", str(tuned), "-o", str(tmp_path / "m.onnx"), "--tuners-as-inputs", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    trainable = safetensors.torch.load_file(str(tuned / TENSORS))
    assert report["tuner_inputs"] == len(trainable) and not report["folded"]
    assert set(trainable) <= set(report["inputs"]) and all(check["passed"] for check in report["parity"])
    checks = report["adapter"]["parity"] + report["defaults_parity"]  # m.onnx_adapter, and m.onnx unfed
    assert report["adapter"]["tensors"] == len(trainable) and all(check["passed"] for check in checks)
    assert (tmp_path / "m.onnx_adapter").is_file()


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / FOLDED_TENSORS).write_bytes(b"not safetensors"), "does not match the sha256"),
        (lambda d: (d / FOLD_REPORT).write_text("{"), "fold.json: not valid JSON"),
        (lambda d: (d / FOLD_REPORT).unlink() or (d / MANIFEST).unlink(), "no tuned or folded artifact"),
        (lambda d: (d / TENSORS).write_bytes(b"x"), "does not match the sha256"),
    ],
)
def test_damaged_folded_artifacts_are_one_line_errors(tmp_path, capsys, damage, message):
    tuned = _artifact(tmp_path, VIT)
    folded = tmp_path / "folded"
    assert main(["fold", str(tuned), "-o", str(folded)]) == 0
    damage(folded)
    capsys.readouterr()
    assert main(["export", str(folded), "-o", str(tmp_path / "m.onnx")]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_folded_weights_of_another_model_are_refused(tmp_path, capsys):
    first, second = _artifact(tmp_path, VIT, name="a"), _artifact(tmp_path, RESNET, name="b")
    for source, out in ((first, "fa"), (second, "fb")):
        assert main(["fold", str(source), "-o", str(tmp_path / out)]) == 0
    for name in (FOLDED_TENSORS, FOLD_REPORT):  # ResNet weights under the ViT's manifest
        (tmp_path / "fa" / name).write_bytes((tmp_path / "fb" / name).read_bytes())
    capsys.readouterr()
    assert main(["export", str(tmp_path / "fa"), "-o", str(tmp_path / "m.onnx")]) == 2
    assert "do not fit the folded model" in capsys.readouterr().err


def test_a_failed_fold_leaves_the_previous_output(tmp_path, capsys):
    tuned = _artifact(tmp_path, VIT)
    out = tmp_path / "folded"
    assert main(["fold", str(tuned), "-o", str(out)]) == 0
    before = _digest(out)
    (tuned / TENSORS).write_bytes(b"damaged")
    assert main(["fold", str(tuned), "-o", str(out)]) == 2
    assert _digest(out) == before


def test_bench_times_four_variants_at_each_batch_size(tmp_path, capsys):
    tuned = _artifact(tmp_path, VIT, (RULES / "dual_utuner.yaml").read_text())
    out = tmp_path / "bench.json"
    assert main(["bench", str(tuned), "--batch-sizes", "1,2", "--rounds", "2", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["variant"], r["batch"]) for r in report["rows"]] == [
        (v, b) for b in (1, 2) for v in ("base eager", "tuned eager", "folded eager", "onnxruntime")
    ]
    assert all(r["calls"] == 2 and r["median_ms"] > 0 for r in report["rows"])
    assert set(report["ratios"]) == {
        f"{k}@{b}" for b in (1, 2) for k in ("folded/base", "tuned/base", "ort/folded eager")
    }
    assert "onnxruntime" in capsys.readouterr().out
    assert main(["bench", str(tuned), "--batch-sizes", "1", "--rounds", "1", "--json", "-o", str(out)]) == 0
    assert len(json.loads(capsys.readouterr().out)["rows"]) == 4  # stdout is JSON only; the bar is on stderr
    assert main(["bench", str(tuned), "--batch-sizes", "0"]) == 2


def test_one_onnx_file_switches_between_two_trained_tasks(tmp_path, capsys):
    """Two real training runs (digits, different seeds and shots) share one exported graph."""
    spec = "timm:vit_tiny_patch16_224?img_size=16&patch_size=4&depth=2&num_classes=10&global_pool=avg"
    fast = ["--epochs", "1", "--lr", "1e-2", "--no-augment", "--label-smoothing", "0"]
    for run, seed in (("a", "0"), ("b", "1")):
        assert (
            main(
                [
                    "train",
                    spec,
                    "--rules",
                    str(RULES / "dual_utuner.yaml"),
                    "--data",
                    "digits",
                    "-o",
                    str(tmp_path / run),
                    "--seed",
                    seed,
                    *fast,
                ]
            )
            == 0
        )
    path = tmp_path / "shared.onnx"
    assert main(["export", str(tmp_path / "a"), "-o", str(path), "--tuners-as-inputs"]) == 0
    capsys.readouterr()
    from utune_fx.export import tuner_feeds

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 16, 16)
    outputs = {}
    for run in ("a", "b"):
        model = load_tuned(tmp_path / run / "tuned").module.eval()
        feeds = tuner_feeds(tmp_path / run / "tuned", path)
        outputs[run] = session.run(None, {"x": x.numpy(), **feeds})[0]
        with torch.no_grad():
            np.testing.assert_allclose(outputs[run], model(x).numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(outputs["a"] - outputs["b"]).max() > 1e-3
