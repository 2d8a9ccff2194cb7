"""The hostile inputs of issue 15, one :class:`Case` each, grouped by the issue's probe categories.

    for case in CASES:
        argv = case.build(folder, workspace)      # writes the case's files under folder
        kind = judge(case, outcome, folder)      # "clean" or a failure kind (bounded.FAILURE_KINDS)

tests/test_hostile_corpus.py runs every case in-process (a forked child, bounded);
benchmarks/hostile_probe.py runs them through ``python cli.py`` and counts the kinds per category.
Large inputs are generated here, never stored. Every promise a case checks is the issue's:
``must_fail`` cases must be refused (exit 2, or ``exit_code``), ``must_succeed`` ones must work.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hostile import files
from hostile.bounded import CLEAN, Outcome, classify
from hostile.workspace import REPO, RULES, SPEC, TRAIN_FLAGS, Workspace, edit_json, reseal

CATEGORIES = {
    1: "code execution from an artifact",
    2: "hangs and memory blow-ups from rule files",
    3: "tracebacks",
    4: "wrong successes",
    5: "resume trusts what it is given",
    6: "installs",
    7: "devices",
}
MARKER = "MARKER"


@dataclass
class Case:
    category: int
    name: str
    build: Callable[[Path, Workspace], list[str]]  # writes files under the case folder, returns the CLI argv
    must_fail: bool = False
    must_succeed: bool = False
    exit_code: int | None = None  # the exact non-zero code the promise names
    expect: str | None = None  # a regex the output must hold
    bounded: bool = False  # a hang or memory input: the work bound is what is tested


def judge(case: Case, outcome: Outcome, folder: Path, memory_mb: float = 500) -> str:
    kind = classify(outcome, must_fail=case.must_fail, memory_mb=memory_mb, marker=folder / MARKER)
    if kind != CLEAN:
        return kind
    if case.must_succeed and outcome.returncode != 0:
        return "wrong refusal"
    if case.exit_code is not None and outcome.returncode != case.exit_code:
        return "wrong success" if outcome.returncode == 0 else "wrong refusal"
    if case.expect and not re.search(case.expect, outcome.stdout + outcome.stderr):
        return "wrong success" if outcome.returncode == 0 else "wrong refusal"
    return CLEAN


def _rules(folder: Path, text: str, name: str = "rules.yaml") -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


def _match(text: str, command: str = "match") -> Callable[[Path, Workspace], list[str]]:
    """A case that runs ``match`` (or ``rewrite``) of the tiny model on a rule file."""

    def build(folder: Path, space: Workspace) -> list[str]:
        argv = [command, SPEC, "--rules", _rules(folder, text)]
        return argv + (["-o", str(folder / "out")] if command == "rewrite" else [])

    return build


# -- 1. code execution from an artifact ------------------------------------------------------------
def _code_spec(folder: Path, kind: str) -> str:
    if kind == "module":
        return f"os:system?command=touch+{folder / MARKER}"
    evil = folder / "evil.py"
    evil.write_text(f"import pathlib\npathlib.Path({str(folder / MARKER)!r}).touch()\ndef build():\n    return None\n")
    return f"{evil}:build"


def _poisoned(command: str, kind: str, sealed: bool) -> Callable[[Path, Workspace], list[str]]:
    def build(folder: Path, space: Workspace) -> list[str]:
        spec = _code_spec(folder, kind)
        if command == "resume":
            target = space.run(folder / "run")
            artifact = target / "tuned"
        else:
            target = artifact = space.artifact(folder / "tuned")
        edit_json(artifact / "manifest.json", lambda m: m.update(model=spec))
        if sealed:
            reseal(artifact)
        out = str(folder / "out")
        return {
            "fold": ["fold", str(target), "-o", out],
            "export": ["export", str(target), "-o", out + ".onnx"],
            "bench": ["bench", str(target), "--batch-sizes", "1", "--rounds", "1", "-o", out + ".json"],
            "eval": ["eval", str(target), "--data", "digits"],
            "resume": ["train", str(target), "--data", "digits", "-o", str(target), *TRAIN_FLAGS, "--resume"],
        }[command]

    return build


CODE = [  # resealed, the artifact is consistent: the refusal must say to name the model
    Case(1, f"{command}: model {kind} spec{' (hashes recomputed)' if sealed else ''}", _poisoned(command, kind, sealed),
         must_fail=True, expect="--model" if sealed else None)
    for command in ("fold", "export", "bench", "eval", "resume")
    for kind in ("module", "file")
    for sealed in (False, True)
]  # fmt: skip

# -- 2. hangs and memory blow-ups from rule files ---------------------------------------------------
LAUGH = files.laughs(9, 9)


def _imported_laughs(folder: Path, space: Workspace) -> list[str]:
    _rules(folder, "version: 1\npatterns:\n  p: {node: {kind: linear}, description: " + LAUGH + "}\n", "lib.yaml")
    return ["match", SPEC, "--rules", _rules(folder, files.rule_file(head="imports: [lib.yaml]\n"))]


def _dev_zero(folder: Path, space: Workspace) -> list[str]:
    return ["match", SPEC, "--rules", "/dev/zero"]


def _many_rules(folder: Path, space: Workspace) -> list[str]:
    return ["match", SPEC, "--rules", _rules(folder, files.many_rules(120_000))]


def _glob(where: str) -> str:
    glob = files.stars(25)
    return {
        "scope": files.rule_file(files.rule(extra=f"scope: {glob}")),
        "class": files.rule_file(files.rule(match=f"{{node: {{class: {glob}}}}}", tuner="lora", settings=None)),
        "inside": files.rule_file(files.rule(match=f"{{node: {{inside: {glob}}}}}", tuner="lora", settings=None)),
        "node scope": files.rule_file(files.rule(match=f"{{node: {{scope: {glob}}}}}", tuner="lora", settings=None)),
        "scope form": files.rule_file(files.rule(match=f"{{scope: {glob}}}")),
    }[where]


HANGS = [
    Case(2, "aliases: 9 levels of 9 in rules:", _match(f"version: 1\nrules: {LAUGH}\n"), must_fail=True, bounded=True),
    Case(2, "aliases: in description", _match(files.rule_file(head=f"description: {LAUGH}\n")), must_fail=True,
         bounded=True),
    Case(2, "aliases: under settings", _match(files.rule_file(files.rule(settings=files.laughs(9, 9, mapping=True)))),
         must_fail=True, bounded=True),
    Case(2, "aliases: mappings only", _match(files.rule_file(head=f"patterns: {files.laughs(9, 9, mapping=True)}\n")),
         must_fail=True, bounded=True),
    Case(2, "aliases: in an imported pattern file", _imported_laughs, must_fail=True, bounded=True),
    *[Case(2, f"glob of 25 stars then b in {where}", _match(_glob(where)), bounded=True)
      for where in ("scope", "class", "inside", "node scope", "scope form")],
    Case(2, "graph pattern of 9 unconstrained nodes ->*", _match(files.rule_file(files.rule(match=files.graph_of(9)))),
         bounded=True),
    Case(2, "120,000 rules (10 MB)", _many_rules, must_fail=True, bounded=True),
    Case(2, "a 100,000-character rule name", _match(files.rule_file(files.rule(name="n" * 100_000))), must_fail=True,
         bounded=True),
    Case(2, "--rules /dev/zero", _dev_zero, must_fail=True, bounded=True),
]  # fmt: skip


# -- 3. tracebacks ----------------------------------------------------------------------------------
def _clashing_sources(folder: Path, space: Workspace) -> list[str]:
    for sub, tuner in (("a", "lora"), ("b", "bitfit")):
        (folder / sub).mkdir()
        settings = "{rank: 2}" if tuner == "lora" else None
        _rules(folder / sub, files.rule_file(files.rule(sub, "linear", tuner, settings)), "rules.yaml")
    out = str(folder / "tuned")
    return [
        "rewrite",
        SPEC,
        "--rules",
        str(folder / "a/rules.yaml"),
        "--rules",
        str(folder / "b/rules.yaml"),
        "-o",
        out,
    ]


def _manifest(change: Callable, sealed: bool = True) -> Callable[[Path, Workspace], list[str]]:
    def build(folder: Path, space: Workspace) -> list[str]:
        artifact = space.artifact(folder / "tuned")
        edit_json(artifact / "manifest.json", change)
        if sealed:
            reseal(artifact)
        return ["fold", str(artifact), "-o", str(folder / "out")]

    return build


def _nested_manifest(folder: Path, space: Workspace) -> list[str]:
    artifact = space.artifact(folder / "tuned")
    (artifact / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    return ["fold", str(artifact), "-o", str(folder / "out")]


def _checkpoint(change: Callable, extra: tuple[str, ...] = ()) -> Callable[[Path, Workspace], list[str]]:
    def build(folder: Path, space: Workspace) -> list[str]:
        run = space.run(folder / "run")
        edit_json(run / "checkpoint" / "state.json", change)
        return ["train", str(run), "--data", "digits", "-o", str(run), *TRAIN_FLAGS, *extra, "--resume"]

    return build


def _garbage_tensors(folder: Path, space: Workspace) -> list[str]:
    run = space.run(folder / "run")
    (run / "checkpoint" / "tensors.safetensors").write_bytes(b"\xff" * 8 + b"{not a header")
    return ["train", str(run), "--data", "digits", "-o", str(run), *TRAIN_FLAGS, "--resume"]


def _argv(*argv: str) -> Callable[[Path, Workspace], list[str]]:
    return lambda folder, space: [a.replace("{dir}", str(folder)) for a in argv]


def _deep_predicate(form: str) -> str:
    return files.rule_file(files.rule(match=f"{{node: {files.deep(form, 3000)}}}", tuner="lora", settings=None))


def _pop(key: str) -> Callable:
    return lambda m: m.pop(key)


TRAIN = ["train", SPEC, "--rules", RULES, "--data", "digits", "-o", "{dir}/out"]
TRACEBACKS = [
    Case(3, "rule file with a NUL byte", _match(files.rule_file().replace("name: r", "name: r\0x")), must_fail=True),
    Case(3, "a 5,000-digit integer", _match(files.rule_file(files.rule(settings="{hidden: " + "9" * 5000 + "}"))),
         must_fail=True),
    Case(3, "3,000 levels of not", _match(_deep_predicate("not")), must_fail=True),
    Case(3, "3,000 levels of any_of", _match(_deep_predicate("any_of")), must_fail=True),
    Case(3, "3,000 levels of nested patterns", _match(files.rule_file(files.rule(match=files.deep_pattern(3000)))),
         must_fail=True),
    Case(3, "hidden 2**62 at rewrite", _match(files.rule_file(files.rule(settings=f"{{hidden: {2**62}}}")), "rewrite"),
         must_fail=True),
    Case(3, "a parallel adapter on every node", _match(files.rule_file(files.rule(match="{node: {}}")), "rewrite")),
    Case(3, "manifest: deeply nested JSON", _nested_manifest, must_fail=True),
    Case(3, "manifest: 'rules' missing", _manifest(_pop("rules")), must_fail=True),
    Case(3, "manifest: 'tensors_sha256' missing", _manifest(_pop("tensors_sha256")), must_fail=True),
    Case(3, "manifest: 'rules' a string", _manifest(lambda m: m.update(rules="x")), must_fail=True),
    Case(3, "manifest: 'input_shapes' a number", _manifest(lambda m: m.update(input_shapes=7)), must_fail=True),
    Case(3, "manifest: a list", _manifest(lambda m: [m]), must_fail=True),
    Case(3, "manifest: source name '../x.yaml'",
         _manifest(lambda m: m["rules"][0]["sources"].update({"../x.yaml": "version: 1"})), must_fail=True),
    Case(3, "rule source names that clash", _clashing_sources),
    Case(3, "checkpoint: epoch a string", _checkpoint(lambda s: s["progress"].update(epoch="x")), must_fail=True),
    Case(3, "checkpoint: optimizer missing", _checkpoint(lambda s: s.pop("optimizer")), must_fail=True),
    Case(3, "checkpoint: rng.python a number", _checkpoint(lambda s: s["rng"].update(python=3)), must_fail=True),
    Case(3, "checkpoint: param_groups emptied", _checkpoint(lambda s: s["optimizer"].update(param_groups=[])),
         must_fail=True),
    Case(3, "checkpoint: tensors not safetensors", _garbage_tensors, must_fail=True),
    *[Case(3, f"model spec {spec!r}", _argv("inspect", spec), must_fail=True) for spec in (
        "timm:", "timm:no_such_model", "timm:resnet18?depth=abc", "timm:resnet18?num_classes=nan", ":", "os:",
        "os:system", "no.such.module:build", "{dir}/missing.py:build", f"{REPO}/tests/toy_models.py:not_a_model",
        "timm:resnet18?num_classes=1000000000000", "timm:resnet18?checkpoint_path=/etc/passwd",
        "timm:resnet18?num_classes={a: 1}")],  # fmt: skip
    *[Case(3, f"data spec {spec!r}", _argv(*TRAIN[:5], spec, *TRAIN[6:], *TRAIN_FLAGS), must_fail=True) for spec in (
        "imagefolder:", "cifar:/nonexistent", "npz:{dir}/x.npz", "unknown:thing", "digits?x=1")],
    *[Case(3, f"flag {' '.join(flags)}", _argv(*TRAIN, *TRAIN_FLAGS, *flags), must_fail=True) for flags in (
        ("--lr", "nan"), ("--lr", "inf"), ("--epochs", "0"), ("--batch-size", "-1"), ("--val-size", "2.5"),
        ("--warmup-epochs", "nan"), ("--clip-grad", "inf"), ("--weight-decay", "nan"), ("--epochs", "10**9"))],
    Case(3, "flag --input-shape 2,3,abc", _argv("inspect", SPEC, "--input-shape", "2,3,abc"), must_fail=True),
    Case(3, "flag --input-shape 2,3,-16,16", _argv("inspect", SPEC, "--input-shape", "2,3,-16,16"), must_fail=True),
    Case(3, "flag --input-shape 999999999,3,16,16", _argv("inspect", SPEC, "--input-shape", "999999999,3,16,16"),
         must_fail=True, bounded=True),
]  # fmt: skip


# -- 4. wrong successes -----------------------------------------------------------------------------
def _tensors(fill: float, command: str) -> Callable[[Path, Workspace], list[str]]:
    """An artifact whose tuner tensors (and the classifier, which trains) are all ``fill``, hashes recomputed,
    through ``fold`` or ``export`` (TorchScript: the parity check is the same, the export seconds faster)."""

    def build(folder: Path, space: Workspace) -> list[str]:
        import safetensors.torch

        artifact = space.artifact(folder / "tuned")
        path = artifact / "tuners.safetensors"
        tensors = {k: torch.full_like(v, fill) for k, v in safetensors.torch.load_file(str(path)).items()}
        safetensors.torch.save_file(tensors, str(path))
        reseal(artifact)
        if command == "fold":
            return ["fold", str(artifact), "-o", str(folder / "folded")]
        return ["export", str(artifact), "-o", str(folder / "m.onnx"), "--exporter", "torchscript"]

    return build


def _both(name: str, text: str, **promise) -> list[Case]:
    """The same rule file through match (the dry run) and rewrite: both must agree."""
    return [Case(4, f"{name} ({command})", _match(text, command), **promise) for command in ("match", "rewrite")]


WRONG = [
    *_both("lora alpha .inf", files.rule_file(files.rule(match="linear", tuner="lora", settings="{alpha: .inf}")),
           must_fail=True),
    *_both("adapter scale .nan", files.rule_file(files.rule(settings="{scale: .nan}")), must_fail=True),
    *_both("adapter hidden 10**12", files.rule_file(files.rule(settings=f"{{hidden: {10**12}}}")), must_fail=True),
    *_both("lora rank 10**9", files.rule_file(files.rule(match="linear", tuner="lora", settings=f"{{rank: {10**9}}}")),
           must_fail=True),
    *_both("prefix length 10**8", files.rule_file(files.rule(tuner="prefix", settings=f"{{length: {10**8}}}")),
           must_fail=True),
    *_both("head num_classes 10**12",
           files.rule_file(files.rule(match="head", tuner="head", settings=f"{{num_classes: {10**12}}}")),
           must_fail=True),
    *_both("rules named a-b and a_b", files.rule_file(files.rule("a-b"), files.rule("a_b", match="ffn")),
           must_fail=True),
    *_both("a rule that matches nothing",
           files.rule_file(files.rule(match="{node: {kind: linear, scope: nowhere}}", tuner="lora", settings=None)),
           must_fail=True, exit_code=3),
    *_both("lora on an attention region", files.rule_file(files.rule(match="attention", tuner="lora", settings=None)),
           must_fail=True),
    *[Case(4, f"{command} parity on NaN outputs", _tensors(math.nan, command), must_fail=True,
           expect=r"(?i)nan|finite") for command in ("fold", "export")],
    *[Case(4, f"{command} parity on all-zero outputs", _tensors(0.0, command), expect=r"(?i)zero")
      for command in ("fold", "export")],
]  # fmt: skip

# -- 5. resume --------------------------------------------------------------------------------------
RESUME = [
    Case(5, "--resume with another --batch-size", _checkpoint(lambda s: None, ("--batch-size", "8")), must_fail=True),
    Case(5, "--resume with another --lr", _checkpoint(lambda s: None, ("--lr", "0.5")), must_fail=True),
    Case(5, "--resume with another --seed", _checkpoint(lambda s: None, ("--seed", "7")), must_fail=True),
    Case(5, "checkpoint epoch -1", _checkpoint(lambda s: s["progress"].update(epoch=-1)), must_fail=True),
    Case(5, "checkpoint step 10**12", _checkpoint(lambda s: s["progress"].update(step=10**12)), must_fail=True),
    Case(5, "checkpoint epoch 10**12", _checkpoint(lambda s: s["progress"].update(epoch=10**12)), must_fail=True),
]

# -- 6. installs, 7. devices ------------------------------------------------------------------------
INSTALLS = [
    Case(6, "--rules lora from another directory", _argv("match", SPEC, "--rules", "lora"), must_succeed=True),
    Case(6, "--rules dual_utuner from another directory", _argv("match", SPEC, "--rules", "dual_utuner"),
         must_succeed=True),
    Case(6, "--version", _argv("--version"), must_succeed=True, expect=r"\d+\.\d+"),
    Case(6, "--rules no_such_shipped_file", _argv("match", SPEC, "--rules", "no_such_shipped_file"), must_fail=True),
]  # fmt: skip
NO_CUDA = not torch.cuda.is_available()
DEVICES = [
    Case(7, f"train --device {device}", _argv(*TRAIN, *TRAIN_FLAGS, "--device", device), must_fail=must_fail)
    for device, must_fail in (("cuda", NO_CUDA), ("cuda:0", NO_CUDA), ("cuda:99", True), ("tpu", True), ("cpu", False))
]

CASES = [*CODE, *HANGS, *TRACEBACKS, *WRONG, *RESUME, *INSTALLS, *DEVICES]
assert len({case.name for case in CASES}) == len(CASES), "case names are test ids"


# -- 5. two writers into one -o (two processes at once: run by the test and the probe themselves) ----
def start_first_writer(folder: Path) -> tuple[subprocess.Popen, list[str]]:
    """A long ``train`` into folder/out in another process, and the argv of a second writer: the same
    command with --resume, which a run that trusts its directory would take up. Returns once the first
    run has written its first checkpoint (it is still running then: 60 epochs)."""
    out = folder / "out"
    argv = ["train", SPEC, "--rules", RULES, "--data", "digits", "-o", str(out), "--epochs", "60", "--no-augment",
            "--train-size", "500", "--val-size", "20"]  # fmt: skip
    first = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), *argv], cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    for _ in range(1200):  # at most 2 minutes
        if first.poll() is not None or (out / "checkpoint").is_dir():
            break
        time.sleep(0.1)
    return first, [*argv, "--resume"]


SECOND_WRITER = Case(5, "two writers into one -o", lambda folder, space: [], must_fail=True, expect=r"(?i)lock|in use")
