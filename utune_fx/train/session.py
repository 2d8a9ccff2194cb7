"""What ``cli.py train`` and ``cli.py eval`` do, between parsing and the library.

train:  artifact dir or (model spec + rules) -> tuned model; --data -> splits checked against
        the model's outputs; train -> OUT/{tuned/, checkpoint/, metrics.jsonl, summary.json, curves.png}
        (the CLI also records the data split in OUT/split.json: train/split.py)
eval:   OUT or artifact dir + --data (the source's test split, or the run's validation images: train/split.py)
        -> top-1, top-5, per-class accuracy, confusion matrix (JSON + PNG); for a causal LM loss,
        perplexity and token accuracy
text:   --data jsonl:/csv:/text: with --tokenizer: the model traced at --max-length tokens (train/text.py)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import fx

from utune_fx.errors import UtuneError
from utune_fx.rewrite.artifact import (
    TunedSource,
    artifact_directory,
    base_sha256,
    build_tuned,
    load_tuned,
    save_tuned,
)
from utune_fx.trace.annotate import set_training
from utune_fx.train.distributed import launched_world
from utune_fx.train.outputs import model_logits, output_logits_shape
from utune_fx.train.rundir import CHECKPOINT, TUNED, TUNED_TENSORS, check_run_result, config_settings, file_sha256


def tuned_model(
    model: str,
    rules: list[str] | None,
    input_shapes: list[str] | None,
    frontend: str,
    seed: int = 0,
    base_model: str | None = None,
    text_length: int | None = None,
):
    """A RewriteResult from an artifact directory (``base_model``: --model SPEC, see load_tuned), or from
    a model spec rewritten with rule files (traced at ``text_length`` tokens for text data, unless
    ``input_shapes`` say otherwise: train/text.py)."""
    from utune_fx.match import load_rules

    directory = checked_artifact_directory(model)
    if directory is not None:
        if rules:
            raise UtuneError(f"{model} is a tuned artifact and brings its own rules; drop --rules")
        return load_tuned(directory, model=base_model)
    if base_model is not None:
        raise UtuneError(f"--model names the base model of a tuned artifact, and {model} is not one; drop --model")
    if not rules:
        raise UtuneError(
            f"{model} is not a tuned artifact directory; give a model spec with --rules FILE, "
            "or the directory cli.py rewrite wrote"
        )
    rule_sets = [load_rules(path) for path in rules]
    if text_length is not None and not input_shapes:
        from utune_fx.train.text import build_text_model

        return build_text_model(model, frontend, text_length, rule_sets, seed)
    return build_tuned(TunedSource(model, input_shapes or [], frontend), rule_sets, seed)


def checked_artifact_directory(path: str | Path) -> Path | None:
    """The tuned artifact at ``path`` (see artifact_directory); for a training run, only once its tuned/ is
    the result its summary describes (a run stopped while finishing is one line saying how to finish it)."""
    if _is_run_directory(path):
        check_run_result(Path(path))
    return artifact_directory(path)


def _is_run_directory(path: str | Path) -> bool:
    return _is_directory(Path(path) / CHECKPOINT)


def _is_directory(path: str | Path) -> bool:
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):  # a model spec too long for a path, or with a NUL in it
        return False


def _input_size(module: fx.GraphModule, data_config: dict | None) -> tuple[int, int, int]:
    """The image size the traced model was built for (its example input), channels first."""
    placeholder = next(n for n in module.graph.nodes if n.op == "placeholder")
    shape = placeholder.meta.get("utune").shape if placeholder.meta.get("utune") else None
    if shape and len(shape) == 4:
        return tuple(shape[1:])
    return tuple(data_config["input_size"]) if data_config else (3, 224, 224)


def load_splits(result, data: str, tokenizer=None, max_length: int | None = None, **selection):
    """The splits of ``data`` for the tuned model: images at the size it was traced at, or text tokenised
    to the sequence length it was traced at (``tokenizer``: a folder or a loaded tokenizer; train/text.py)."""
    from utune_fx.data import load_data
    from utune_fx.data.text import is_text_spec

    if is_text_spec(data):
        from utune_fx.train.text import load_text_splits

        return load_text_splits(result, data, tokenizer, max_length, **selection)
    if tokenizer is not None or max_length is not None:
        from utune_fx.train.text import prepare_text

        prepare_text(data, tokenizer, max_length)  # refuses them for images
    splits = load_data(
        data, input_size=_input_size(result.module, result.data_config), data_config=result.data_config, **selection
    )
    check_classes(result, data, splits)
    return splits


def check_classes(result, data: str, splits) -> None:
    """The model's outputs are the data's classes."""
    shape = output_logits_shape(result.module)
    outputs = shape[-1] if shape else None
    if outputs is not None and outputs != len(splits.classes):
        raise UtuneError(
            f"the model has {outputs} outputs but {data} has {len(splits.classes)} classes; add "
            f"num_classes: {len(splits.classes)} to the head rule's settings (tuner: head), or "
            f"?num_classes={len(splits.classes)} to the model spec (hf: ?num_labels={len(splits.classes)})"
        )


def cli_settings(args, config) -> dict:
    """What a run from the command line records and ``--resume`` holds to: every TrainConfig field and
    the model, rule files (by content), input shapes, front end and data selection."""
    rules = list(args.rules or [])
    return config_settings(config) | {
        "model": str(Path(args.model).resolve()) if _is_directory(args.model) else args.model,  # an artifact
        "rules": rules,
        "rules_sha256": [file_sha256(path) or f"name:{path}" for path in rules],  # a shipped rule file by name
        "input_shape": list(args.input_shape or []),
        "frontend": args.frontend,
        "data": args.data,
        "shots": args.shots,
        "train_size": args.train_size,
        "val_size": args.val_size,
        "no_augment": args.no_augment,
        "skip_bad_images": args.skip_bad_images,
        "tokenizer": _tokenizer_path(getattr(args, "tokenizer", None)),
        "max_length": getattr(args, "max_length", None),
    }


def _tokenizer_path(tokenizer: str | None) -> str | None:
    """--tokenizer as an absolute path: the same folder named from elsewhere is the same setting."""
    return str(Path(tokenizer).expanduser().resolve()) if tokenizer else None


def run_training(result, splits, config, out: Path, resume: bool, settings: dict | None = None) -> dict:
    """Train, then save tuned/ and (last) summary.json, which records the epoch and tuned/'s hash so that
    readers can tell a finished run from one stopped on the way (rundir.check_run_result)."""
    from utune_fx.train import train
    from utune_fx.train.tasks import task_named

    if config.fsdp and launched_world()[0] == 0:  # FSDP leaves the frozen weights sharded (parallel.py): hash
        result.base_sha256 = base_sha256(result.module)  # them whole, now, for the manifest save_tuned writes

    def finish(summary: dict) -> None:  # rank 0 only
        save_tuned(result, result.rule_sets, result.source, out / TUNED)
        summary["task"], summary["classes"] = splits.task, len(splits.classes)
        summary["tuned_sha256"] = file_sha256(out / TUNED / TUNED_TENSORS)

    return train(
        result.module,
        splits.train,
        splits.val,
        config,
        out,
        resume=resume,
        test_set=splits.test,
        settings=settings,
        finish=finish,
        task=task_named(splits.task),
    )


@torch.no_grad()
def evaluate_classes(module: torch.nn.Module, dataset, classes: list[str], batch_size: int = 64) -> dict:
    from torch.utils.data import DataLoader

    set_training(module, False)
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    top5 = seen = 0
    for inputs, labels in DataLoader(dataset, batch_size=batch_size):
        logits = model_logits(module, inputs)
        confusion += torch.bincount(labels * len(classes) + logits.argmax(-1), minlength=len(classes) ** 2).reshape(
            len(classes), len(classes)
        )
        k = min(5, logits.shape[-1])
        top5 += (logits.topk(k, dim=-1).indices == labels[:, None]).any(-1).sum().item()
        seen += len(labels)
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    return {
        "images": seen,
        "top1": confusion.diag().sum().item() / max(seen, 1),
        "top5": top5 / max(seen, 1),
        "per_class": dict(zip(classes, per_class)),
        "confusion": confusion.tolist(),
    }


@torch.no_grad()
def evaluate_tokens(module: torch.nn.Module, dataset, batch_size: int = 64) -> dict:
    """A causal language model on ``dataset``: loss per predicted token, perplexity, token accuracy."""
    from utune_fx.train import TrainConfig, evaluate
    from utune_fx.train.tasks import task_named

    config = TrainConfig(batch_size=batch_size // 2, device="cpu", precision="fp32")  # evaluate doubles it
    return {"images": len(dataset)} | evaluate(module, dataset, config, torch.device("cpu"), task_named("causal-lm"))
