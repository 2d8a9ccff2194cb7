"""Artifacts are data (issue 15): nothing in a manifest, fold report or model card can make utune_fx
import or call code, and every damaged field is one `error:` line with exit 2.

One tiny artifact per module: a one-block ViT built by a model *file* (a file spec), LoRA rules,
10 outputs for scikit-learn's digits. The file touches a marker when it is imported, so a test can
tell whether the code ran.
"""

import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import timm
import torch

from utune_fx.cli import main
from utune_fx.errors import UtuneError
from utune_fx.fold.artifact import FOLD_REPORT
from utune_fx.rewrite.artifact import MANIFEST, load_tuned
from utune_fx.rewrite.manifest import manifest_sha256, read_manifest, seal, write_manifest
from utune_fx.specs import load_model

TIMM_ARGS = {"img_size": 16, "patch_size": 4, "depth": 1, "num_classes": 10, "global_pool": "avg"}
RULES = str(Path(__file__).resolve().parents[1] / "rules" / "lora.yaml")
MODEL_FILE = """\
from pathlib import Path

import timm

Path({marker!r}).touch()  # proof that this file ran


def build():
    return timm.create_model("vit_tiny_patch16_224", **{kwargs!r})
"""


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(the artifact, the file spec that built it, the marker its import touches)."""
    root = tmp_path_factory.mktemp("hardening")
    marker = root / "model_file_ran"
    (root / "tinynet.py").write_text(MODEL_FILE.format(marker=str(marker), kwargs=TIMM_ARGS))
    spec = f"{root / 'tinynet.py'}:build"
    out = root / "tuned"
    assert main(["rewrite", spec, "--input-shape", "2,3,16,16", "--rules", RULES, "-o", str(out)]) == 0
    marker.unlink()
    return out, spec, marker


@pytest.fixture()
def artifact(made, tmp_path):
    """A fresh copy of the module's artifact, to damage."""
    return Path(shutil.copytree(made[0], tmp_path / "tuned"))


def _one_error_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def _edit(directory: Path, change, reseal: bool = True) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    change(manifest)
    if reseal:  # as an attacker would: the self hash is a checksum, not a signature
        write_manifest(directory, manifest)
    else:
        (directory / MANIFEST).write_text(json.dumps(manifest))


def _commands(directory: Path, tmp_path: Path) -> dict[str, list[str]]:
    return {
        "fold": ["fold", str(directory), "-o", str(tmp_path / "folded")],
        "export": ["export", str(directory), "-o", str(tmp_path / "m.onnx")],
        "bench": ["bench", str(directory), "--batch-sizes", "1", "--rounds", "1", "-o", str(tmp_path / "b.json")],
        "eval": ["eval", str(directory), "--data", "digits", "-o", str(tmp_path / "eval")],
        "train": ["train", str(directory), "--data", "digits", "-o", str(tmp_path / "run"), "--epochs", "1"],
    }


COMMANDS = ["fold", "export", "bench", "eval", "train"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_recorded_code_spec_never_runs_without_model(made, artifact, tmp_path, capsys, command):
    _, spec, marker = made
    err = _one_error_line(capsys, _commands(artifact, tmp_path)[command])
    assert "runs code from the file" in err and f"--model {spec}" in err
    assert not marker.exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_an_import_spec_written_into_a_manifest_does_not_run(artifact, tmp_path, capsys, command):
    marker = tmp_path / "os_system_ran"
    _edit(artifact, lambda m: m.update(model=f"os:system?command=touch+{marker}"))
    err = _one_error_line(capsys, _commands(artifact, tmp_path)[command])
    assert "runs code from the module 'os'" in err and "--model" in err
    assert not marker.exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_file_spec_written_into_a_manifest_does_not_run(artifact, tmp_path, capsys, command):
    marker = tmp_path / "evil_ran"
    (tmp_path / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\nbuild = None\n")
    _edit(artifact, lambda m: m.update(model=f"{tmp_path / 'evil.py'}:build"))
    err = _one_error_line(capsys, _commands(artifact, tmp_path)[command])
    assert "runs code from the file" in err and "evil.py" in err
    assert not marker.exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_naming_the_model_on_the_command_line_rebuilds_it(made, artifact, tmp_path, capsys, command):
    _, spec, marker = made
    capsys.readouterr()
    assert main([*_commands(artifact, tmp_path)[command], "--model", spec]) == 0, capsys.readouterr().err
    assert marker.exists()


def test_python_callers_pass_the_model_as_a_spec_or_a_module(made, artifact):
    _, spec, _ = made
    with pytest.raises(UtuneError, match=r"runs code from the file .*load_tuned\(DIR, model="):
        load_tuned(artifact)
    by_spec = load_tuned(artifact, model=spec)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # what building from a spec does, so the frozen weights match
        module = timm.create_model("vit_tiny_patch16_224", **TIMM_ARGS)
    by_module = load_tuned(artifact, model=module)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(by_spec.module(x), by_module.module(x))


def test_model_on_a_model_spec_is_refused(made, tmp_path, capsys):
    _, spec, _ = made
    argv = ["train", "timm:resnet18", "--rules", RULES, "--data", "digits", "-o", str(tmp_path / "r"), "--model", spec]
    assert "--model names the base model of a tuned artifact" in _one_error_line(capsys, argv)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("timm:resnet18?checkpoint_path=/tmp/evil.pth", "option 'checkpoint_path'"),
        ("timm:resnet18?pretrained_cfg_overlay={file: /tmp/evil.pth}", "option 'pretrained_cfg_overlay'"),
        ("timm:resnet18?act_layer={a: 1}", "option act_layer .* is a dict"),
    ],
)
def test_timm_options_stay_data_in_a_manifest_and_on_the_command_line(artifact, capsys, spec, message):
    _edit(artifact, lambda m: m.update(model=spec))
    err = _one_error_line(capsys, ["fold", str(artifact), "-o", str(artifact.parent / "f")])
    assert "manifest.json: model: " in err
    assert re.search(message, err), err
    err = _one_error_line(capsys, ["inspect", spec])
    assert re.search(message, err), err


REQUIRED = ["format", "model", "input_shapes", "frontend", "rules", "versions", "summary", "tensors"]
REQUIRED += ["tensors_sha256", "base_sha256"]
WRONG = {
    "format": 5,
    "model": ["timm:resnet18"],
    "input_shapes": "2,3,16,16",
    "frontend": "magic",
    "rules": {},
    "versions": [],
    "summary": {"a": 1},
    "tensors": {"utune.lora.0.down.weight": ["8"]},
    "tensors_sha256": "0" * 63,
    "base_sha256": None,
    "manifest_sha256": "not hex",
}


@pytest.mark.parametrize("key", REQUIRED)
def test_a_missing_manifest_key_is_one_line_naming_it(artifact, tmp_path, capsys, key):
    _edit(artifact, lambda m: m.pop(key), reseal=False)
    err = _one_error_line(capsys, ["fold", str(artifact), "-o", str(tmp_path / "f")])
    assert "manifest.json" in err and f"'{key}' is a required property" in err


@pytest.mark.parametrize("key", sorted(WRONG))
def test_a_wrong_typed_manifest_key_is_one_line_naming_it(artifact, tmp_path, capsys, key):
    _edit(artifact, lambda m: m.update({key: WRONG[key]}), reseal=False)
    err = _one_error_line(capsys, ["export", str(artifact), "-o", str(tmp_path / "m.onnx")])
    assert f"manifest.json: {key}" in err


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda text: "[" * 5000 + "]" * 5000, "nested deeper than 64 levels"),
        (lambda text: text.replace('"frontend": "auto"', '"frontend": NaN'), "NaN is not a JSON number"),
        (lambda text: text.replace('"frontend": "auto"', '"frontend": Infinity'), "Infinity is not a JSON number"),
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (lambda text: json.dumps({"format": "utune_fx.tuned/1", "rules": [[[[[[]]]]]]}), "is a required property"),
        (lambda text: text.replace('"frontend": "auto"', '"frontend": "fx"'), "does not match its manifest_sha256"),
    ],
)
def test_damaged_manifest_text_is_one_line(artifact, tmp_path, capsys, damage, message):
    path = artifact / MANIFEST
    path.write_text(damage(path.read_text()))
    err = _one_error_line(capsys, ["fold", str(artifact), "-o", str(tmp_path / "f")])
    assert message in err


def test_non_utf8_and_huge_manifests_are_one_line(artifact, tmp_path, capsys):
    path = artifact / MANIFEST
    path.write_bytes(b'{"format": "\xff"}')
    assert "cannot read" in _one_error_line(capsys, ["fold", str(artifact), "-o", str(tmp_path / "f")])
    with path.open("wb") as handle:
        handle.truncate(65 * 2**20)  # sparse: refused by its size before it is read
    assert "over the limit" in _one_error_line(capsys, ["fold", str(artifact), "-o", str(tmp_path / "f")])


def test_an_unsealed_manifest_says_how_to_seal_it(artifact):
    _edit(artifact, lambda m: m.pop("manifest_sha256"), reseal=False)
    with pytest.raises(UtuneError, match=r"no manifest_sha256; .* seal it with python -c") as caught:
        read_manifest(artifact)
    assert "\n" not in str(caught.value)
    seal(artifact)
    manifest = read_manifest(artifact)
    assert manifest["manifest_sha256"] == manifest_sha256(manifest)


@pytest.mark.parametrize(
    "names,message",
    [
        (["../x.yaml"], "not a plain relative path"),
        (["/etc/x.yaml"], "not a plain relative path"),
        (["a\0b.yaml"], "not a plain relative path"),
        (["a/./b.yaml"], "not a plain relative path"),
        (["a\\b.yaml"], "not a plain relative path"),
        (["x.yaml", "X.yaml"], "name the same file"),
        (["a", "a/b.yaml"], "is a file and also the folder of"),
    ],
)
def test_clashing_rule_source_names_are_refused(artifact, tmp_path, capsys, names, message):
    def add(manifest):
        entry = manifest["rules"][0]
        for name in names:
            entry["sources"][name] = "version: 1\n"
            entry["sha256"][name] = "0" * 64

    manifest = json.loads((artifact / MANIFEST).read_text())
    add(manifest)
    manifest["manifest_sha256"] = manifest_sha256(manifest)  # sealed by hand: write_manifest refuses these too
    (artifact / MANIFEST).write_text(json.dumps(manifest))
    err = _one_error_line(capsys, ["fold", str(artifact), "-o", str(tmp_path / "f")])
    assert "rules[0].sources" in err and message in err
    with pytest.raises(UtuneError, match=message):
        write_manifest(artifact, manifest)


def test_damaged_fold_report_fields_are_one_line(made, artifact, tmp_path, capsys):
    _, spec, _ = made
    folded = tmp_path / "folded"
    assert main(["fold", str(artifact), "-o", str(folded), "--model", spec]) == 0
    report = json.loads((folded / FOLD_REPORT).read_text())
    report["entries"][0]["status"] = "exploded"
    (folded / FOLD_REPORT).write_text(json.dumps(report))
    err = _one_error_line(capsys, ["export", str(folded), "-o", str(tmp_path / "m.onnx"), "--model", spec])
    assert "fold.json: entries[0].status" in err
    (folded / FOLD_REPORT).write_text(json.dumps({"format": "utune_fx.folded/1"}))
    err = _one_error_line(capsys, ["export", str(folded), "-o", str(tmp_path / "m.onnx"), "--model", spec])
    assert "fold.json: (top level): 'entries' is a required property" in err


def _card(tmp_path: Path, **fields) -> Path:
    card = {"timm_model": "vit_tiny_patch16_224", "kwargs": TIMM_ARGS, "weights": "none.safetensors", **fields}
    (tmp_path / "card.json").write_text(json.dumps(card))
    return tmp_path / "card.json"


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"timm_model": "vit_tiny; rm -rf /"}, "timm_model: "),
        ({"kwargs": {"checkpoint_path": "evil.pth"}}, "option 'checkpoint_path'"),
        ({"kwargs": {"pretrained_cfg_overlay": {"file": "evil.pth"}}}, "kwargs.pretrained_cfg_overlay: "),
        ({"normalisation": {"mean": [0.5, 0.5, 0.5], "std": [0, 1, 1]}}, r"normalisation.std[0]: "),
        ({"crop_pct": -1}, "crop_pct: "),
        ({"weights": ""}, "weights: "),
    ],
)
def test_a_broken_model_card_field_is_one_line(tmp_path, capsys, fields, message):
    path = _card(tmp_path, **fields)
    err = _one_error_line(capsys, ["inspect", f"{path}?weights=none"])
    assert message in err


def test_a_model_card_is_bounded_json(tmp_path):
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    with pytest.raises(UtuneError, match="zero.json is not a regular file"):
        load_model(str(tmp_path / "zero.json"))
    path = tmp_path / "card.json"
    path.write_text('{"timm_model": "vit_tiny_patch16_224", "crop_pct": NaN}')
    with pytest.raises(UtuneError, match="NaN is not a JSON number"):
        load_model(str(path))
    path.write_text('{"timm_model": "vit_tiny_patch16_224", "notes": ' + "[" * 100 + "]" * 100 + "}")
    with pytest.raises(UtuneError, match="nested deeper than 64 levels"):
        load_model(str(path))


def test_tuner_input_metadata_of_an_onnx_file_is_checked(made, artifact, tmp_path):
    import onnx

    from utune_fx.export.feeds import TUNER_INPUTS_KEY, onnx_tuner_inputs

    _, spec, _ = made
    path = tmp_path / "m.onnx"
    assert main(["export", str(artifact), "-o", str(path), "--tuners-as-inputs", "--model", spec]) == 0
    model = onnx.load(str(path))
    for text, message in (("[1, 2]", r"\[\d\]: \d is not of type 'string'"), ('["nope"]', "not an input of the graph")):
        (entry,) = [p for p in model.metadata_props if p.key == TUNER_INPUTS_KEY]
        entry.value = text
        onnx.save(model, str(path))
        with pytest.raises(UtuneError, match=message):
            onnx_tuner_inputs(path)
    path.write_bytes(b"not protobuf at all")
    with pytest.raises(UtuneError, match="not a readable ONNX file"):
        onnx_tuner_inputs(path)


def test_the_rewrite_refuses_imports_an_artifact_cannot_hold(tmp_path, capsys):
    (tmp_path / "shared.yaml").write_text("version: 1\npatterns:\n  qkv: {node: {kind: linear, scope: '**.qkv'}}\n")
    (tmp_path / "main").mkdir()
    (tmp_path / "main" / "rules.yaml").write_text(
        textwrap.dedent("""
        version: 1
        imports: [../shared.yaml]
        rules: [{name: lora, match: qkv, tuner: lora}]
        """)
    )
    argv = ["rewrite", "timm:vit_tiny_patch16_224?img_size=16&patch_size=4&depth=1"]
    argv += ["--rules", str(tmp_path / "main" / "rules.yaml"), "-o", str(tmp_path / "out")]
    err = _one_error_line(capsys, argv)
    assert "'../shared.yaml' is not a plain relative path" in err and "move the imported files" in err
    assert not (tmp_path / "out").exists()


def test_lone_surrogates_in_rule_sources_are_one_line(artifact, tmp_path, capsys):
    path = artifact / MANIFEST
    manifest = json.loads(path.read_text())
    entry = manifest["rules"][0]
    (name,) = entry["sources"]
    entry["sources"][name] = "version: 1\n# \ud800\n"
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    path.write_text(json.dumps(manifest))  # ensure_ascii: the file spells it \ud800
    err = _one_error_line(capsys, ["fold", str(artifact), "-o", str(tmp_path / "f")])
    assert f"rules[0].sources: {name} is not valid Unicode text" in err
    entry["sources"] = {name: entry["sources"][name].replace("\ud800", ""), "x\udc00.yaml": "version: 1\n"}
    path.write_text(json.dumps(manifest))
    assert "lone surrogates" in _one_error_line(capsys, ["fold", str(artifact), "-o", str(tmp_path / "f")])


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model": "timm:vit_tiny_patch16_224?num_classes=1000000000000"}, "GiB of memory available"),
        ({"model": "timm:vit_tiny_patch16_224?img_size=1000000&patch_size=4"}, "GiB of memory available"),
        ({"input_shapes": ["100000,100000,100000"]}, "over the limit of 134,217,728 for an example input"),
        ({"model": "timm:vit_tiny_patch16_224?depth=100000000"}, "block and layer counts are at most 256"),
        ({"model": "timm:efficientnet_b0?depth_multiplier=1000"}, "block and layer counts are at most 16"),
    ],
)
def test_sizes_in_a_manifest_cannot_exhaust_memory(artifact, tmp_path, capsys, change, message):
    _edit(artifact, lambda m: m.update(change))
    argv = ["fold", str(artifact), "-o", str(tmp_path / "f")]
    if "input_shapes" in change:
        argv += ["--model", f"timm:vit_tiny_patch16_224?{'&'.join(f'{k}={v}' for k, v in TIMM_ARGS.items())}"]
    assert message in _one_error_line(capsys, argv)
