"""cli.py inspect: the report, the acceptance models, and user errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utune_fx.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOY = "tests/toy_models.py"
SMALL_VIT = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2"


def _json_report(capsys, *args):
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_report_has_everything_a_tool_needs(capsys):
    import timm

    expected_parameters = sum(
        p.numel() for p in timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).parameters()
    )
    report = _json_report(capsys, SMALL_VIT)
    assert report["frontend"] == "fx" and report["inputs"] == [[2, 3, 32, 32]]
    assert report["parameters"] == expected_parameters
    assert report["op_kinds"]["attention"] == 2 and report["op_kinds"]["linear"] == 9
    ops = report["operations"]
    assert ops["attention"]["scopes"] == ["blocks.{0,1}.attn"]
    assert [i["scope"] for i in ops["mlp"]["items"]] == ["blocks.0.mlp", "blocks.1.mlp"]
    assert ops["attention"]["items"][0]["in_shape"] == [2, 17, 192]
    assert report["opaque"] == [] and report["trace_seconds"] > 0


@pytest.mark.parametrize(
    "spec,scope",
    [
        ("timm:vit_base_patch16_224", "blocks.{i}.{kind}"),
        ("timm:swin_tiny_patch4_window7_224", None),
    ],
)
def test_acceptance_models_list_12_attention_and_12_mlp_with_scopes(capsys, spec, scope):
    assert main(["inspect", spec]) == 0
    text = capsys.readouterr().out
    assert "Operations you can target" in text and "Opaque modules  none" in text
    for kind in ("attention", "mlp"):
        assert f"{kind} (12)" in text
    if scope:
        for i in range(12):
            for kind in ("attn", "mlp"):
                assert scope.format(i=i, kind=kind) in text
    else:  # swin: 2, 2, 6, 2 blocks in 4 stages
        stages = [(s, b) for s, depth in enumerate((2, 2, 6, 2)) for b in range(depth)]
        for s, b in stages:
            assert f"layers.{s}.blocks.{b}.attn" in text and f"layers.{s}.blocks.{b}.mlp" in text


def test_opaque_modules_are_listed_with_the_reason(capsys):
    report = _json_report(capsys, f"{TOY}:build_gated_net", "--input-shape", "2,16")
    assert [(o["path"], o["class"]) for o in report["opaque"]] == [("gate", "Gate")]
    assert "control flow" in report["opaque"][0]["reason"]


def test_export_front_end_is_reported(capsys):
    assert main(["inspect", f"{TOY}:build_per_token", "--input-shape", "2,3,8"]) == 0
    assert "torch.fx could not trace it" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["timm:vit_bse_patch16_224"], "unknown timm model"),
        (["missing.py:build"], "model file 'missing.py' not found"),
        ([f"{TOY}:not_a_model"], "not a torch.nn.Module"),
        (["timm:resnet18", "--input-shape", "2,x"], "bad --input-shape"),
        (["timm:resnet18", "--input-shape", "2,3,7"], "rejects example input(s) of shape 2x3x7"),
        ([f"{TOY}:build_data_dependent_root", "--input-shape", "2,8"], "cannot be traced"),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, args, message):
    assert main(["inspect", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_debug_shows_the_traceback(capsys):
    assert main(["--debug", "inspect", "missing.py:build"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith("check the path")


def test_cli_script_runs_as_a_program():
    env = {**os.environ, "COLUMNS": "120"}
    done = subprocess.run(
        [sys.executable, "cli.py", "inspect", "timm:nope_model"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: unknown timm model 'nope_model'") and done.stderr.count("\n") == 1
    done = subprocess.run(
        [sys.executable, "cli.py", "inspect", SMALL_VIT, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["operations"]["attention"]["count"] == 2


def test_an_error_quoting_megabytes_of_input_stays_one_short_line_that_keeps_its_advice():
    from utune_fx.errors import MAX_MESSAGE, UtuneError, first_line

    error = UtuneError("rules.yaml:3:1: name: " + "x\n" * 500_000 + "; use a shorter name")
    assert "\n" not in str(error) and len(str(error)) <= MAX_MESSAGE
    assert str(error).startswith("rules.yaml:3:1: name: x x") and str(error).endswith("x ; use a shorter name")
    assert "characters]" in str(error)
    assert len(first_line(ValueError("y" * 100_000))) <= MAX_MESSAGE
