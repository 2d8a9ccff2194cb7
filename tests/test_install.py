"""Installs: the wheel carries every file utune_fx reads, shipped rule files resolve by name from
any directory, ``--version`` and the program name, and the wheel runs from a fresh environment.

The fresh-environment check builds an sdist from a copy of the tree, a wheel from that sdist,
installs the wheel with --no-deps into a new virtual environment outside the repository, and
makes this environment's dependencies visible through a plain .pth path line (which does not
run the editable install's hook, so ``utune_fx`` can only come from the wheel). Installing
torch and the rest again would cost minutes of CI for no extra coverage of utune_fx's files.
Set UTUNE_FX_SKIP_WHEEL_CHECK=1 to skip it locally; CI (CI=true) always runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from utune_fx.cli import build_parser, main
from utune_fx.match import RuleError, load_rules
from utune_fx.rewrite.artifact import MANIFEST, load_tuned
from utune_fx.rulefiles import shipped_rule_names, shipped_rules_folder

REPO = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
SMALL_VIT = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2"
SKIP_WHEEL_CHECK = os.environ.get("UTUNE_FX_SKIP_WHEEL_CHECK") == "1" and os.environ.get("CI") != "true"


def _run(command: list, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _checked(command: list, cwd: Path | None = None, env: dict | None = None) -> str:
    done = _run(command, cwd, env)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _source_files() -> set[str]:
    """What the wheel must hold: every file of the package, and the shipped rule files as utune_fx/rules."""
    package = {
        path.relative_to(REPO).as_posix()
        for path in (REPO / "utune_fx").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    return package | {f"utune_fx/rules/{path.name}" for path in (REPO / "rules").glob("*.yaml")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built the way `pip install` from an sdist would: tree -> sdist -> wheel, in a copy
    of the tree (the build writes build/ and *.egg-info beside the sources)."""
    work = tmp_path_factory.mktemp("build")
    source = work / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("utune_fx", "rules"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build_sdist = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    sdist = work / "dist" / _checked([sys.executable, "-c", build_sdist, work / "dist"], cwd=source).split()[-1]
    pip_wheel = ["-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", work / "dist"]
    _checked([sys.executable, *pip_wheel, sdist], cwd=work)
    (built,) = (work / "dist").glob("utune_fx-*.whl")
    return built


def test_wheel_carries_every_file_of_the_package_and_the_shipped_rule_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_source_files() - names)
    assert not missing, f"not in the wheel (add to [tool.setuptools] in pyproject.toml): {missing}"
    assert wheel.name == f"utune_fx-{VERSION}-py3-none-any.whl"


@pytest.mark.skipif(SKIP_WHEEL_CHECK, reason="UTUNE_FX_SKIP_WHEEL_CHECK=1 outside CI")
def test_wheel_runs_from_a_fresh_environment_in_another_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    _checked([sys.executable, "-m", "venv", "--without-pip", venv])
    python, script = venv / "bin" / "python", venv / "bin" / "utune-fx"
    _checked([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])
    fresh_site = Path(_checked([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (fresh_site / "_utune_fx_dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}

    imported = _checked([python, "-c", "import utune_fx; print(utune_fx.__file__)"], elsewhere, env).strip()
    assert Path(imported).is_relative_to(venv), f"utune_fx came from {imported}, not from the wheel"
    assert _checked([script, "--version"], elsewhere, env).strip() == f"utune_fx {VERSION}"
    usage = _run([script], elsewhere, env)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: utune-fx ")
    matched = _checked(
        [script, "match", "timm:resnet18", "--input-shape", "2,3,32,32", "--rules", "lora"], elsewhere, env
    )
    assert "total: 20 region(s)" in matched
    tune = (
        "import utune_fx, timm, torch; m = timm.create_model('resnet18', num_classes=3); "
        "t = utune_fx.tune(m, 'lora', torch.randn(2, 3, 32, 32)); "
        "print(t is m, type(t).__name__, utune_fx.trainable_parameters(t)[0] > 0)"
    )
    assert _checked([python, "-c", tune], elsewhere, env).split() == ["True", "ResNet", "True"]


def test_every_shipped_rule_file_loads_by_name_from_another_directory(tmp_path, monkeypatch):
    names = shipped_rule_names()
    assert names == sorted(path.stem for path in (REPO / "rules").glob("*.yaml"))
    monkeypatch.chdir(tmp_path)
    for name in [*names, "lora.yaml"]:
        loaded = load_rules(name)
        assert Path(loaded.path) == shipped_rules_folder() / f"{Path(name).stem}.yaml"
        assert loaded.rules and list(loaded.sources) == [f"{Path(name).stem}.yaml"]


def test_a_path_that_exists_wins_over_a_shipped_name(tmp_path, monkeypatch):
    (tmp_path / "lora.yaml").write_text("version: 1\nrules: [{name: mine, match: head, tuner: head}]\n")
    monkeypatch.chdir(tmp_path)
    assert [rule.name for rule in load_rules("lora.yaml").rules] == ["mine"]
    assert [rule.name for rule in load_rules("lora").rules] != ["mine"]  # no file named 'lora' here


@pytest.mark.parametrize("given", ["lorra", "rules/lora.yaml", "dual-utuner"])
def test_an_unknown_rule_file_is_one_line_with_the_shipped_names(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuleError, match=r"rule file not found; .*\(adapter, bitfit, dual_utuner, .*\); did") as caught:
        load_rules(given)
    message = str(caught.value)
    assert message.startswith(f"{given}: ") and "\n" not in message
    assert message.endswith("did you mean --rules dual_utuner?" if "dual" in given else "did you mean --rules lora?")


def test_cli_reports_an_unknown_rule_file_before_building_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["match", "timm:not_a_model", "--rules", "lorra"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: lorra: rule file not found") and error.count("\n") == 1


def test_artifact_of_a_named_rule_file_reloads_in_another_directory(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert main(["rewrite", SMALL_VIT, "--rules", "lora", "-o", str(tmp_path / "tuned")]) == 0
    manifest = json.loads((tmp_path / "tuned" / MANIFEST).read_text())
    assert manifest["rules"][0]["sources"] == {"lora.yaml": (shipped_rules_folder() / "lora.yaml").read_text()}
    monkeypatch.chdir(tmp_path / "b")
    assert sum(summary.regions for summary in load_tuned(tmp_path / "tuned").summaries) > 0


def test_version_comes_from_pyproject(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"utune_fx {VERSION}\n"


@pytest.mark.parametrize("argv0,program", [("/env/bin/utune-fx", "utune-fx"), ("cli.py", "cli.py")])
def test_usage_names_the_program_as_it_was_called(monkeypatch, argv0, program):
    monkeypatch.setattr(sys, "argv", [argv0])
    assert build_parser().format_usage().startswith(f"usage: {program} ")
