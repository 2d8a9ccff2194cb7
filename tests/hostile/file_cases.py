"""Hostile artifacts, checkpoints, data, specs, flags and devices (issue 15, categories 1 and 3-7):
code named by a manifest or pickled into data, damaged and hand-edited fields, special files
(FIFOs, links to /dev/zero), NaN and all-zero tuners, resumes that change the run, installs, devices.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hostile import files
from hostile.case import MARKER, Case, argv_of, rules_file, through_cli
from hostile.workspace import (
    REPO,
    RULES,
    SPEC,
    TRAIN_FLAGS,
    Workspace,
    edit_json,
    reseal,
    resume_argv,
    run_quietly,
)


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


def _poisoned_resume(kind: str) -> Callable[[Path, Workspace], list[str]]:
    """A run trained from an artifact; then the artifact's model spec is changed (hashes recomputed) and
    the run resumed exactly as it was started: the path on which a resume rebuilds from the artifact."""

    def build(folder: Path, space: Workspace) -> list[str]:
        artifact = space.artifact(folder / "tuned")
        argv = ["train", str(artifact), "--data", "digits", "-o", str(folder / "run"), *TRAIN_FLAGS]
        run_quietly(argv)
        spec = _code_spec(folder, kind)
        edit_json(artifact / "manifest.json", lambda m: m.update(model=spec))
        reseal(artifact)
        return [*argv, "--resume"]

    return build


CODE_RESUME = [Case(1, f"resume from an artifact: model {kind} spec (hashes recomputed)", _poisoned_resume(kind),
                    must_fail=True) for kind in ("module", "file")]  # fmt: skip
CODE = [  # resealed, an artifact is consistent: the refusal must say to name the model (a resumed run may first
    # refuse the changed settings it records)
    Case(1, f"{command}: model {kind} spec{' (hashes recomputed)' if sealed else ''}", _poisoned(command, kind, sealed),
         must_fail=True, expect="--model" if sealed and command != "resume" else None)
    for command in ("fold", "export", "bench", "eval", "resume")
    for kind in ("module", "file")
    for sealed in (False, True)
]  # fmt: skip


class _Payload:
    """Pickles to a call of os.system: what a loader that unpickles would run."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def _pickled(kind: str) -> Callable[[Path, Workspace], list[str]]:
    """Data and weights files that carry a pickle payload touching the marker."""

    def build(folder: Path, space: Workspace) -> list[str]:
        import pickle

        import numpy as np

        payload = _Payload(f"touch {folder / MARKER}")
        train = [*TRAIN[:5], "DATA", "-o", str(folder / "out"), *TRAIN_FLAGS]
        if kind == "npz":
            np.savez(folder / "data.npz", x_train=np.array([payload], dtype=object), y_train=np.array([0]))
            return [a.replace("DATA", f"npz:{folder / 'data.npz'}") for a in train]
        if kind == "cifar":
            for name in ("data_batch_1", "test_batch", "batches.meta"):
                (folder / name).write_bytes(pickle.dumps({"data": payload, "labels": [0]}))
            return [a.replace("DATA", f"cifar:{folder}") for a in train]
        (folder / "weights.pth").write_bytes(pickle.dumps({"state_dict": payload}))
        return ["inspect", SPEC, "--weights", str(folder / "weights.pth")]

    return build


PICKLES = [
    Case(1, f"data: a pickle payload in {kind}", _pickled(kind), must_fail=True) for kind in ("npz", "cifar", "weights")
]


# -- 3. tracebacks: artifacts, checkpoints, specs, data, flags ---------------------------------------
def _clashing_sources(folder: Path, space: Workspace) -> list[str]:
    for sub, tuner in (("a", "lora"), ("b", "bitfit")):
        (folder / sub).mkdir()
        settings = "{rank: 2}" if tuner == "lora" else None
        rules_file(folder / sub, files.rule_file(files.rule(sub, "linear", tuner, settings)), "rules.yaml")
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
        return resume_argv(run, *extra)

    return build


def _garbage_tensors(folder: Path, space: Workspace) -> list[str]:
    run = space.run(folder / "run")
    (run / "checkpoint" / "tensors.safetensors").write_bytes(b"\xff" * 8 + b"{not a header")
    return resume_argv(run)


def _megabyte_header_field(folder: Path, space: Workspace) -> list[str]:
    """tuners.safetensors whose header gives a shape as a 1 MB string; hashes recomputed."""
    artifact = space.artifact(folder / "tuned")
    path = artifact / "tuners.safetensors"
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    first = next(name for name in header if name != "__metadata__")
    header[first]["shape"][0] = "x" * 10**6
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])
    reseal(artifact)
    return ["fold", str(artifact), "-o", str(folder / "out")]


def _pop(key: str) -> Callable:
    return lambda m: m.pop(key)


TRAIN = ["train", SPEC, "--rules", RULES, "--data", "digits", "-o", "{dir}/out"]
INPUT_TRACEBACKS = [
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
    Case(3, "tensor header: a shape given as a 1 MB string (echoed?)", _megabyte_header_field, must_fail=True),
    *[Case(3, f"model spec {spec!r}", argv_of("inspect", spec), must_fail=True) for spec in (
        "timm:", "timm:no_such_model", "timm:resnet18?depth=abc", "timm:resnet18?num_classes=nan", ":", "os:",
        "os:system", "no.such.module:build", "{dir}/missing.py:build", f"{REPO}/tests/toy_models.py:not_a_model",
        "timm:resnet18?num_classes=1000000000000", "timm:resnet18?checkpoint_path=/etc/passwd",
        "timm:resnet18?num_classes={a: 1}")],  # fmt: skip
    *[Case(3, f"data spec {spec!r}", argv_of(*TRAIN[:5], spec, *TRAIN[6:], *TRAIN_FLAGS), must_fail=True) for spec in (
        "imagefolder:", "cifar:/nonexistent", "npz:{dir}/x.npz", "unknown:thing", "digits?x=1")],
    *[Case(3, f"flag {' '.join(flags)}", argv_of(*TRAIN, *TRAIN_FLAGS, *flags), must_fail=True) for flags in (
        ("--lr", "nan"), ("--lr", "inf"), ("--epochs", "0"), ("--batch-size", "-1"), ("--val-size", "2.5"),
        ("--warmup-epochs", "nan"), ("--clip-grad", "inf"), ("--weight-decay", "nan"), ("--epochs", "10**9"))],
    Case(3, "flag --input-shape 2,3,abc", argv_of("inspect", SPEC, "--input-shape", "2,3,abc"), must_fail=True),
    Case(3, "flag --input-shape 2,3,-16,16", argv_of("inspect", SPEC, "--input-shape", "2,3,-16,16"), must_fail=True),
    Case(3, "flag --input-shape 999999999,3,16,16", argv_of("inspect", SPEC, "--input-shape", "999999999,3,16,16"),
         must_fail=True, bounded=True),
]  # fmt: skip


def _special_file(name: str, kind: str) -> Callable[[Path, Workspace], list[str]]:
    """An artifact or run whose ``name`` is a FIFO (a read waits for a writer forever) or a link to /dev/zero
    (endless); tar files carry both."""

    def build(folder: Path, space: Workspace) -> list[str]:
        import os

        run = name.startswith("checkpoint/")
        target = space.run(folder / "run") if run else space.artifact(folder / "tuned")
        path = target / name
        path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to("/dev/zero")
        if run:
            return resume_argv(target)
        return ["fold", str(target), "-o", str(folder / "out")]

    return build


SPECIAL_FILES = [
    *[Case(3, f"{name} is a {kind}", _special_file(name, kind), must_fail=True, bounded=True)
      for name in ("manifest.json", "tuners.safetensors", "checkpoint/state.json", "checkpoint/tensors.safetensors")
      for kind in ("fifo", "link to /dev/zero")],
]  # fmt: skip


# -- 4. wrong successes: parity checks
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


PARITY = [
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
    Case(6, "--rules lora from another directory", argv_of("match", SPEC, "--rules", "lora"), must_succeed=True),
    Case(6, "--rules dual_utuner from another directory", argv_of("match", SPEC, "--rules", "dual_utuner"),
         must_succeed=True),
    Case(6, "--version", argv_of("--version"), must_succeed=True, expect=r"\d+\.\d+"),
    Case(6, "--rules no_such_shipped_file", argv_of("match", SPEC, "--rules", "no_such_shipped_file"), must_fail=True),
]  # fmt: skip
NO_CUDA = not torch.cuda.is_available()
DEVICES = [
    Case(7, f"train --device {device}", argv_of(*TRAIN, *TRAIN_FLAGS, "--device", device), must_fail=refused,
         must_succeed=not refused)
    for device, refused in (("cuda", NO_CUDA), ("cuda:0", NO_CUDA), ("cuda:99", True), ("tpu", True), ("cpu", False))
]  # fmt: skip

# -- controls: the inputs the cases damage, undamaged, work (so no refusal above is for another reason) ---
SANE_RULES = files.rule_file(files.rule(), files.rule("f", match="ffn"))
CONTROLS = [
    Case(0, "match: sane rules", through_cli(SANE_RULES), must_succeed=True),
    Case(0, "rewrite: sane rules", through_cli(SANE_RULES, "rewrite"), must_succeed=True),
    Case(0, "fold: the artifact as written", _manifest(lambda m: None, sealed=False), must_succeed=True),
    Case(0, "fold: the artifact resealed unchanged", _manifest(lambda m: None), must_succeed=True),
    Case(0, "resume: the run as written", _checkpoint(lambda s: None), must_succeed=True),
    Case(0, "eval: the run", lambda folder, space: ["eval", str(space.run(folder / "run")), "--data", "digits"],
         must_succeed=True),
]  # fmt: skip


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
