"""Tuned artifacts: exact round trip, located errors, atomic writes; cli.py rewrite."""

import json
import textwrap

import pytest
import safetensors.torch
import torch

from utune_fx.cli import main
from utune_fx.errors import UtuneError
from utune_fx.rewrite.artifact import MANIFEST, TENSORS, load_tuned
from utune_fx.rewrite.manifest import write_manifest

SPEC = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2"
RULES = "rules/dual_utuner.yaml"


@pytest.fixture()
def artifact(tmp_path, capsys):
    out = tmp_path / "tuned"
    assert main(["rewrite", SPEC, "--rules", RULES, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 adapted operation(s)" in text and "% of the base model" in text
    return out


def test_round_trip_is_exact_with_trained_tuners(artifact, tmp_path):
    first = load_tuned(artifact)
    torch.manual_seed(3)
    for parameter in first.module.parameters():
        if parameter.requires_grad:
            with torch.no_grad():
                parameter.normal_(0, 0.1)
    tensors = {n: p.detach().contiguous() for n, p in first.module.named_parameters() if p.requires_grad}
    safetensors.torch.save_file(tensors, str(artifact / TENSORS))
    manifest = json.loads((artifact / MANIFEST).read_text())
    import hashlib

    manifest["tensors_sha256"] = hashlib.sha256((artifact / TENSORS).read_bytes()).hexdigest()
    write_manifest(artifact, manifest)  # re-sealed: an edit must recompute manifest_sha256
    second = load_tuned(artifact)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(first.module(x), second.module(x))
    assert manifest["versions"]["torch"] == torch.__version__
    assert set(manifest["tensors"]) == set(tensors)


def test_rules_with_imports_rebuild(tmp_path):
    (tmp_path / "lib.yaml").write_text("version: 1\npatterns:\n  qkv_linear: {node: {kind: linear, scope: '**.qkv'}}\n")
    (tmp_path / "main.yaml").write_text(
        textwrap.dedent("""
        version: 1
        imports: [lib.yaml]
        rules: [{name: lora, match: qkv_linear, tuner: lora}]
        """)
    )
    out = tmp_path / "tuned"
    assert main(["rewrite", SPEC, "--rules", str(tmp_path / "main.yaml"), "-o", str(out)]) == 0
    assert load_tuned(out).summaries[0].regions == 2


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / TENSORS).unlink(), r"tuners\.safetensors is missing"),
        (lambda d: (d / MANIFEST).unlink(), r"manifest\.json is missing"),
        (lambda d: (d / TENSORS).write_bytes(b"garbage"), r"does not match the sha256 in manifest\.json"),
        (lambda d: (d / MANIFEST).write_text("{not json"), r"manifest\.json: not valid JSON"),
        (lambda d: (d / MANIFEST).write_text(json.dumps({"format": "other"})), r"not a utune_fx tuned artifact"),
        (
            lambda d: (d / MANIFEST).write_text((d / MANIFEST).read_text().replace("hidden: 8", "hidden: 9")),
            r"rule text of dual_utuner\.yaml does not match its sha256",
        ),
    ],
)
def test_damaged_artifacts_give_one_clear_line(artifact, damage, message):
    damage(artifact)
    with pytest.raises(UtuneError, match=message) as caught:
        load_tuned(artifact)
    assert "\n" not in str(caught.value)


def test_a_failed_write_leaves_the_existing_artifact_intact(artifact, monkeypatch, capsys):
    before = {p.name: p.read_bytes() for p in artifact.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        main(["rewrite", SPEC, "--rules", RULES, "-o", str(artifact)])
    assert {p.name: p.read_bytes() for p in artifact.iterdir()} == before
    assert [p.name for p in artifact.parent.iterdir()] == [artifact.name]  # no staging left behind


def test_no_artifact_here(tmp_path):
    with pytest.raises(UtuneError, match="no tuned artifact here"):
        load_tuned(tmp_path / "nothing")


def test_other_base_weights_are_refused(artifact):
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["base_sha256"] = "0" * 64
    write_manifest(artifact, manifest)
    with pytest.raises(UtuneError, match=r"now has other weights than the ones it was tuned on"):
        load_tuned(artifact)
