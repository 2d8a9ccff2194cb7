"""The data split a training run records, so that ``cli.py eval`` measures the run's own images.

    write_split(out, split_record(data, selection, splits), resume)   # train: before the first epoch
    plan = plan_eval(directory, data, split, seed)                     # eval: refusals that need no data
    dataset, classes, facts = eval_images(result, plan)                # eval: the images, checked

OUT/split.json records the ``--data`` spec (as given, and with its path made absolute), the selection
that draws the training and validation images from it (``--shots``, ``--train-size``, ``--val-size``,
``--seed``, ``--skip-bad-images``) and, per split, the image count and a sha256 over the images'
names and labels (ImageDataset.sha256). ``eval --split val`` draws the validation images again with
that spec and selection and checks count and sha256: it measures the run's validation images, or one
line says why it cannot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from utune_fx.atomic import write_text
from utune_fx.errors import UtuneError
from utune_fx.schemas import read_json
from utune_fx.train.rundir import CHECKPOINT, TUNED

SPLIT = "split.json"
FORMAT = "utune_fx.split/1"
SELECTION = ("shots", "train_size", "val_size", "seed", "skip_bad_images")
_DAMAGED = "a damaged split.json: train the run again to record its split"


def canonical_spec(spec: str) -> str:
    """``spec`` with its path absolute (``~`` expanded, links resolved), so that the same data named from
    another folder compares equal; specs without a path (``digits``) as they are."""
    body, mark, query = spec.partition("?")
    scheme, colon, location = body.partition(":")
    if not colon or not location:
        return spec
    try:
        location = str(Path(location).expanduser().resolve())
    except (OSError, RuntimeError, ValueError):  # a loop of links, a NUL: the reader refuses it later
        return spec
    return f"{scheme}:{location}{mark}{query}"


def _images(dataset) -> dict | None:
    return None if dataset is None else {"images": len(dataset), "sha256": dataset.sha256()}


def split_record(data: str, selection: dict, splits, tokenizer: str | None = None) -> dict:
    """What OUT/split.json holds for a run that drew ``splits`` from ``data`` with ``selection`` (and, for
    text, the task and the tokenizer folder, which eval uses again)."""
    text = {} if tokenizer is None else {"task": splits.task, "tokenizer": str(Path(tokenizer).expanduser().resolve())}
    return {
        "format": FORMAT,
        "data": data,
        "source": canonical_spec(data),
        "selection": {name: selection[name] for name in SELECTION},
        "classes": len(splits.classes),
        "train": _images(splits.train),
        "val": _images(splits.val),
        "test": _images(splits.test),
    } | text


def read_split(path: Path) -> dict:
    return read_json(path, "split", _DAMAGED)


def write_split(out: Path, record: dict, resume: bool) -> None:
    """Record the run's split (atomically); a resumed run must draw the images it started with."""
    path = Path(out) / SPLIT
    if resume and path.is_file():
        old = read_split(path)
        if changed := [name for name in ("classes", "train", "val", "test") if old[name] != record[name]]:
            raise UtuneError(
                f"{out}: --data {record['data']} gives other images than the run started with "
                f"({', '.join(changed)} differ from {path}); restore the data, or start a new run in another -o"
            )
    write_text(path, json.dumps(record, indent=1) + "\n")


@dataclass
class EvalPlan:
    directory: str
    data: str | None  # --data as given (None: the run's)
    split: str  # "test" or "val", as asked
    seed: int | None  # --seed as given
    run: Path | None  # the training run DIR is (or whose tuned/ it is)
    record: dict | None  # its split.json
    same: bool  # the data is the run's: its selection applies
    tokenizer: str | None = None  # --tokenizer as given, else the run's (text data)


def _run_of(directory: str) -> tuple[Path | None, dict | None]:
    """The training run ``directory`` is, or whose tuned/ it is, and its recorded split (None if none)."""
    path = Path(directory)
    for run in (path, path.parent) if path.name == TUNED else (path,):
        try:
            if (run / SPLIT).is_file():
                return run, read_split(run / SPLIT)
            if (run / CHECKPOINT).is_dir():
                return run, None
        except (OSError, ValueError):  # a spec too long for a path, a NUL in it
            return None, None
    return None, None


def _no_split(plan: EvalPlan) -> tuple[str, str]:
    """Why ``plan`` has no recorded split, and what to do for the run's validation images."""
    if plan.run is not None:
        return (
            f"{plan.run} records no data split ({plan.run / SPLIT} is missing: the run predates it)",
            "evaluate --split test, or train it again (a run now records its split)",
        )
    return (
        f"{plan.directory} is a tuned artifact, not a training run, and records no data split",
        "name the run directory (train -o OUT), or evaluate --split test",
    )


def plan_eval(directory: str, data: str | None, split: str, seed: int | None, tokenizer: str | None = None) -> EvalPlan:
    """What eval reads, and the refusals that need neither model nor data: --split val of a run that records
    no split, of other data than the run's, or with another seed; no --data and no recorded split."""
    run, record = _run_of(directory)
    same = record is not None and (data is None or canonical_spec(data) == record["source"])
    tokenizer = tokenizer or (record or {}).get("tokenizer")
    plan = EvalPlan(directory, data, split, seed, run, record, same, tokenizer)
    if split == "val":
        _check_val(plan, "--split val evaluates the run's validation images")
    if data is None and record is None:
        raise UtuneError(f"{_no_split(plan)[0]}; give --data SPEC")
    return plan


def _check_val(plan: EvalPlan, why: str) -> None:
    if plan.record is None:
        reason, fix = _no_split(plan)
        raise UtuneError(f"{why}, but {reason}; {fix}")
    recorded = plan.record["data"]
    if not plan.same:
        raise UtuneError(
            f"{why}, drawn from the run's --data {recorded}, not {plan.data}; pass --data {recorded}, "
            "or leave --data out"
        )
    if plan.seed is not None and plan.seed != plan.record["selection"]["seed"]:
        raise UtuneError(
            f"{why}, which the run drew with --seed {plan.record['selection']['seed']}, not {plan.seed}; "
            "leave --seed out"
        )


def eval_images(result, plan: EvalPlan) -> tuple[object, list[str], dict]:
    """The dataset eval measures, the class names, and what the report says of the images: the source's
    test split, or the run's validation images (checked against split.json)."""
    from utune_fx.train.session import load_splits

    if plan.same:
        record = plan.record
        splits = load_splits(result, record["source"], plan.tokenizer, augment=False, **record["selection"])
    else:
        splits = load_splits(result, plan.data, plan.tokenizer, seed=plan.seed or 0, augment=False)
    data, task = plan.data or plan.record["data"], {"task": splits.task}
    if plan.split == "test" and splits.test is not None:
        digest = splits.test.sha256()
        test = plan.record["test"] if plan.same else None
        facts = task | {"split": "test", "data": data, "images_sha256": digest}
        return splits.test, splits.classes, facts | {"run_split": test is not None and test["sha256"] == digest}
    if plan.split == "test":
        _check_val(plan, f"{data} has no test split, so eval measures the run's validation images")
    digest, recorded = splits.val.sha256(), plan.record["val"]
    if (len(splits.val), digest) != (recorded["images"], recorded["sha256"]):
        raise UtuneError(
            f"the validation images drawn from {data} now ({len(splits.val)}) are not the run's "
            f"({recorded['images']}, {plan.run / SPLIT}): the data changed since training; restore it, or train again"
        )
    facts = task | {"split": "validation", "data": data, "images_sha256": digest, "run_split": True}
    return splits.val, splits.classes, facts | {"selection": plan.record["selection"]}
