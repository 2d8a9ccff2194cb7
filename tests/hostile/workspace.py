"""One real tiny tuned artifact and one real tiny training run, built once and copied per case.

    space = Workspace(root)               # builds nothing yet
    space.artifact(dest)                  # a copy of DIR written by cli.py rewrite
    space.run(dest)                       # a copy of OUT written by cli.py train (1 epoch, digits)
    resume_argv(run, *extra)              # train --resume of that run, as it was started
    edit_json(path, change)               # change(data) edits the parsed file in place; written back
    reseal(directory)                     # recompute the hashes an attacker can recompute

A ViT of one block, 16 channels and 16x16 inputs: rewrite takes a fraction of a second,
training one epoch on 100 digits under a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SPEC = "timm:vit_tiny_patch16_224?img_size=16&patch_size=8&depth=1&num_classes=10&embed_dim=16&num_heads=1"
RULES = str(REPO / "rules" / "dual_utuner.yaml")
TRAIN_FLAGS = ["--epochs", "1", "--no-augment", "--train-size", "100", "--val-size", "20", "--batch-size", "32"]


def run_quietly(argv: list[str]) -> int:
    """cli.main with its output kept; a failure to build what a case needs is an error of the test."""
    from utune_fx.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"building the workspace failed: {argv}: {err.getvalue()[-2000:]}")
    return code


class Workspace:
    """Lazily built originals under ``root``; callers get copies to damage."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._artifact: Path | None = None
        self._run: Path | None = None

    def artifact(self, dest: Path) -> Path:
        if self._artifact is None:
            self._artifact = self.root / "original-artifact"
            run_quietly(["rewrite", SPEC, "--rules", RULES, "-o", str(self._artifact)])
        shutil.copytree(self._artifact, dest)
        return dest

    def run(self, dest: Path) -> Path:
        if self._run is None:
            self._run = self.root / "original-run"
            run_quietly(["train", SPEC, "--rules", RULES, "--data", "digits", "-o", str(self._run), *TRAIN_FLAGS])
        shutil.copytree(self._run, dest)
        return dest


def resume_argv(run: Path, *extra: str) -> list[str]:
    """``train --resume`` of the workspace's run exactly as it was started (a resume that names another
    model or other rules is refused for that alone), with ``extra`` flags after the run's own."""
    return ["train", SPEC, "--rules", RULES, "--data", "digits", "-o", str(run), *TRAIN_FLAGS, *extra, "--resume"]


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    """Parse, let ``change`` edit (or return a replacement), write back; NaN is written as NaN."""
    data = json.loads(Path(path).read_text())
    replaced = change(data)
    Path(path).write_text(json.dumps(data if replaced is None else replaced))


def reseal(directory: Path) -> None:
    """What an attacker does after editing an artifact: recompute every hash it carries (the rule
    texts', the tensors' and, where the manifest has one, its own). A value that cannot be hashed
    canonically (NaN) is left as it is."""
    path = Path(directory) / "manifest.json"
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict):
        return
    for entry in manifest.get("rules", []) if isinstance(manifest.get("rules"), list) else []:
        with contextlib.suppress(AttributeError, TypeError, UnicodeEncodeError):
            entry["sha256"] = {
                name: hashlib.sha256(text.encode()).hexdigest() for name, text in entry["sources"].items()
            }
    tensors = Path(directory) / "tuners.safetensors"
    if tensors.is_file():
        manifest["tensors_sha256"] = hashlib.sha256(tensors.read_bytes()).hexdigest()
    try:
        from utune_fx.rewrite.manifest import SELF_HASH, manifest_sha256
    except ImportError:  # a library that does not seal its manifests
        pass
    else:
        with contextlib.suppress(ValueError, TypeError):
            manifest[SELF_HASH] = manifest_sha256(manifest)
    path.write_text(json.dumps(manifest))
