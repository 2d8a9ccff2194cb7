"""Folded artifacts: a tuned artifact plus the folded weights and the fold report.

    cli.py fold DIR -o OUT  ->  OUT/manifest.json, OUT/tuners.safetensors   (DIR's, unchanged: OUT
                                                                             still rebuilds the tuned model)
                                OUT/folded.safetensors   every tensor of the folded model, a tied one once
                                                         (under its first name); after a LoRA-only fold
                                                         these load into the plain base model
                                                         (safetensors.torch.load_model restores the ties)
                                OUT/fold.json            the report (folded / constant / in place / kept,
                                                         with reasons), the folded-vs-tuned difference,
                                                         sha256 of folded.safetensors

``load_folded`` rebuilds the tuned model, folds it again (folding is
deterministic) and loads ``folded.safetensors`` into the result, checking every
name and shape, so a damaged or mismatched file is one line, never a wrong model.
fold.json is read through utune_fx/schemas (fold_report.schema.json). The base
model is rebuilt as load_tuned does: a spec that runs code only when the caller
names it (``model=``, ``--model SPEC``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import safetensors.torch
import torch

from utune_fx.atomic import replace_directory
from utune_fx.errors import UtuneError, first_line
from utune_fx.fold import FoldResult, fold, folded_difference
from utune_fx.rewrite.artifact import MANIFEST, TENSORS, file_sha256, load_tuned
from utune_fx.schemas import check_json, read_json
from utune_fx.tied import one_copy, with_aliases
from utune_fx.trace.annotate import set_training

FOLD_FORMAT = "utune_fx.folded/1"
FOLD_REPORT, FOLDED_TENSORS = "fold.json", "folded.safetensors"
_REFOLD = "the folded artifact is damaged or was edited; fold again with cli.py fold"


def is_folded(directory: str | Path) -> bool:
    return (Path(directory) / FOLD_REPORT).is_file()


def fold_artifact(directory: str | Path, model=None) -> tuple[object, FoldResult, float]:
    """Load a tuned artifact (``model``: as for load_tuned) and fold it: (the tuned RewriteResult,
    the fold, max relative difference of folded vs tuned outputs on the example inputs)."""
    result = load_tuned(directory, model=model)
    folded = fold(result.module, result.summaries)
    return result, folded, folded_difference(result.module, folded.module, result.example_inputs, folded.warnings)


def save_folded(directory: str | Path, folded: FoldResult, difference: float, out: str | Path) -> Path:
    directory, out = Path(directory), Path(out)
    kept, _ = one_copy(folded.module.state_dict(), folded.module)  # a tied tensor once, not once per name
    tensors = {name: t.detach().contiguous().clone() for name, t in kept.items()}
    with replace_directory(out) as staging:
        for name in (MANIFEST, TENSORS):
            shutil.copyfile(directory / name, staging / name)
        safetensors.torch.save_file(tensors, str(staging / FOLDED_TENSORS))
        report = {
            "format": FOLD_FORMAT,
            "entries": folded.to_json(),
            "relative_difference": difference if math.isfinite(difference) else None,  # JSON has no NaN
            "folded_sha256": file_sha256(staging / FOLDED_TENSORS),
        }
        (staging / FOLD_REPORT).write_text(json.dumps(report, indent=1, allow_nan=False))
    return out


def read_fold_report(directory: Path) -> dict:
    """fold.json: bounded, schema-checked, of the right format; one line otherwise."""
    path = directory / FOLD_REPORT
    report = read_json(path, "format", _REFOLD)
    if report["format"] != FOLD_FORMAT:
        raise UtuneError(f"{path}: not a utune_fx fold report (format {report['format']!r}, expected {FOLD_FORMAT!r})")
    return check_json(report, "fold_report", str(path), _REFOLD)


def load_folded(directory: str | Path, model=None) -> tuple[object, FoldResult]:
    """The tuned RewriteResult and its fold, with the folded weights read from the artifact
    (``model``: as for load_tuned)."""
    directory = Path(directory)
    report = read_fold_report(directory)
    path = directory / FOLDED_TENSORS
    if not path.is_file() or file_sha256(path) != report["folded_sha256"]:
        raise UtuneError(
            f"{path} is missing or does not match the sha256 in {FOLD_REPORT}; fold again with cli.py fold"
        )
    result = load_tuned(directory, model=model)
    folded = fold(result.module, result.summaries)
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as error:  # safetensors raises its own types for damaged headers
        raise UtuneError(f"{path}: cannot read ({first_line(error)}); {_REFOLD}") from error
    expected, aliases = one_copy(folded.module.state_dict(), folded.module)
    if set(tensors) != set(expected):
        missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise UtuneError(f"{path}: tensors do not fit the folded model (missing {missing[:3]}, unknown {unknown[:3]})")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise UtuneError(
                f"{path}: {name} is {tensor.dtype} {list(tensor.shape)}, the folded model has "
                f"{expected[name].dtype} {list(expected[name].shape)}"
            )
    with torch.no_grad():
        folded.module.load_state_dict(with_aliases(tensors, aliases), strict=True)
    return result, folded


def load_for_inference(
    path: str | Path, fold_it: bool = False, model=None
) -> tuple[object, torch.nn.Module, FoldResult | None]:
    """What export and bench run: a folded artifact's folded model, a tuned artifact (or a
    training run's ``tuned/``) folded now when ``fold_it``, or the tuned model as it is
    (``model``: as for load_tuned)."""
    from utune_fx.rewrite.artifact import artifact_directory

    directory = artifact_directory(path)
    if directory is None:
        raise UtuneError(f"{path}: no tuned or folded artifact here; write one with cli.py rewrite, train or fold")
    if is_folded(directory):
        result, folded = load_folded(directory, model=model)
        return result, folded.module, folded
    result = load_tuned(directory, model=model)
    if not fold_it:
        set_training(result.module, False)
        return result, result.module, None
    folded = fold(result.module, result.summaries)
    return result, folded.module, folded
