"""The training commands of cli.py: parse, call the library, print.

python cli.py train DIR_OR_MODEL [--rules FILE ...] --data SPEC -o OUT [--epochs N --lr X ...] [--resume]
                   [--tokenizer DIR --max-length N]   (text data: train/text.py)
                                               a training run (train/session.py, train/rundir.py)
torchrun --nproc-per-node N cli.py train ... [--fsdp]
                                               the same run in N processes (train/distributed.py,
                                               train/parallel.py); rank 0 writes and prints
python cli.py eval DIR [--data SPEC] [--split test|val] [--tokenizer DIR]
                                               accuracy, per-class accuracy, confusion matrix
                                               (a causal LM: loss, perplexity, token accuracy)
"""

from __future__ import annotations

import argparse
import contextlib
import json

from rich.console import Console

from utune_fx.cli_deploy import add_base_model_flag
from utune_fx.cli_support import add_model_arguments, add_output_flags, print_json
from utune_fx.errors import UtuneError


def add_training_commands(commands, rules_help: str) -> None:
    """The train and eval subcommands (``rules_help``: what --rules takes, shipped names included)."""
    train = commands.add_parser("train", help="train a tuned model (an artifact, or a model spec with --rules)")
    add_model_arguments(train, None)
    train.add_argument("--rules", action="append", metavar="FILE", help=f"when MODEL is a model spec: {rules_help}")
    train.add_argument("-o", "--output", required=True, metavar="OUT", help="run directory")
    train.add_argument(
        "--allow-empty", action="store_true", help="train even if a rule of --rules matches nothing (else exit 3)"
    )
    add_base_model_flag(train)
    _add_data_arguments(train)
    _add_training_arguments(train)
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="accuracy, per-class accuracy and confusion matrix of a tuned model")
    evaluate.add_argument("directory", metavar="DIR", help="a training run (OUT, or OUT/tuned) or a tuned artifact")
    evaluate.add_argument(
        "--data",
        metavar="SPEC",
        help="imagefolder:PATH, cifar:PATH, npz:PATH, digits, jsonl:PATH?text=F&label=F, csv:PATH?..., "
        "text:PATH (see docs/data.md); default: the run's (DIR/split.json)",
    )
    _add_tokenizer_flag(evaluate, "the run's, DIR/split.json")
    evaluate.add_argument(
        "--seed",
        type=int,
        help="seeds the selection of data other than the run's (the run's data uses its recorded seed)",
    )
    evaluate.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="test: the source's test split (default; the run's validation images when it has none); "
        "val: the run's own validation images, drawn again from the data and selection DIR/split.json "
        "records (a run without one is refused)",
    )
    evaluate.add_argument("-o", "--output", metavar="DIR", help="where eval.json and confusion.png go (default DIR)")
    add_base_model_flag(evaluate)
    add_output_flags(evaluate, "print the report as JSON")
    evaluate.set_defaults(run=_eval)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from utune_fx.train import TrainConfig
    from utune_fx.train.session import cli_settings

    config = TrainConfig(**{name: getattr(args, name) for name in TrainConfig.help()})  # checked (device too) first
    out = Path(args.output)
    settings = cli_settings(args, config)
    processes = _join_processes(config, args)
    try:
        with _run_directory(out, args.resume, settings, processes):
            summary = _train_locked(args, config, out, settings, processes.is_main)
    finally:
        from utune_fx.train.distributed import stop_processes

        stop_processes()
    return _print_summary(args, out, summary) if processes.is_main else 0


def _join_processes(config, args):
    """This process among torchrun's (one process without it). A refusal here (a global batch that does not
    divide by the processes, a device, --cache-features under torchrun or with augmented images) is the same
    on every rank: rank 0 says it, the others exit quietly."""
    import time

    from utune_fx.data.text import is_text_spec
    from utune_fx.errors import EXIT_USER_ERROR
    from utune_fx.train.distributed import launched_world, start_processes
    from utune_fx.train.feature_cache import refusal_before_model

    try:
        augment = not args.no_augment and not is_text_spec(args.data)
        if config.cache_features and (refusal := refusal_before_model(augment, launched_world()[1])):
            raise UtuneError(refusal)
        return start_processes(config)
    except UtuneError as error:
        if launched_world()[0] != 0:
            # torchrun stops every process once one exits: leave rank 0 the time to print the line and be
            # the first to exit, so that its exit code 2 is the one torchrun reports as the root cause
            time.sleep(_QUIET_RANK_DELAY)
            raise SystemExit(getattr(error, "exit_code", EXIT_USER_ERROR)) from None
        raise


_QUIET_RANK_DELAY = 3.0  # seconds


@contextlib.contextmanager
def _run_directory(out, resume: bool, settings: dict, processes):
    """Rank 0 (the only process without torchrun) locks OUT for the run, repairs what a kill left and holds
    --resume to the run's settings, before any work; the other ranks wait for that, then write nothing."""
    from utune_fx.train.rundir import open_run

    if not processes.is_main:
        processes.barrier()
        yield
        return
    with open_run(out, resume, settings) as notices:
        for notice in notices:
            Console(stderr=True).print(f"resuming {out} with {notice}", soft_wrap=True)
        if settings.get("fsdp") and not processes.active:
            Console(stderr=True).print("--fsdp shards over torchrun's processes; one process trains as is")
        processes.barrier()
        yield


def _train_locked(args: argparse.Namespace, config, out, settings: dict, main: bool = True) -> dict:
    """Build the model, read the data, train: what runs while OUT is locked (``main``: the process that
    writes and prints, rank 0 under torchrun)."""
    from utune_fx.train.session import load_splits, run_training, tuned_model
    from utune_fx.train.split import SELECTION, split_record, write_split
    from utune_fx.train.text import prepare_text

    status = Console(stderr=True, quiet=not main)
    tokenizer, text_length = prepare_text(args.data, args.tokenizer, args.max_length)  # before the model
    with status.status(f"building {args.model}"):
        result = tuned_model(
            args.model,
            args.rules,
            args.input_shape,
            args.frontend,
            args.seed,
            base_model=args.base_model,
            text_length=text_length,
        )
    if args.rules and result.empty_rules and not args.allow_empty:  # as match and rewrite do, before training
        from utune_fx.errors import EmptyRuleError
        from utune_fx.match.report import empty_rules_error

        raise EmptyRuleError(empty_rules_error(result.empty_rules, args.model))
    if config.cache_features:  # what the graph allows, before the data is read (train() checks it again)
        from utune_fx.train.feature_cache import check_split, split_graph

        check_split(split_graph(result.module))
    with status.status(f"reading {args.data}"):
        splits = load_splits(
            result,
            args.data,
            shots=args.shots,
            train_size=args.train_size,
            val_size=args.val_size,
            seed=args.seed,
            augment=not args.no_augment,
            skip_bad_images=args.skip_bad_images,
            tokenizer=tokenizer,
            max_length=args.max_length,
        )
    if main:
        selection = {name: getattr(args, name) for name in SELECTION}
        write_split(out, split_record(args.data, selection, splits, args.tokenizer), args.resume)  # eval reads it
    if main and not args.json:
        from utune_fx.rewrite.report import render_rewrite

        render_rewrite(result, result.source.model, Console(width=max(Console().width, 120)))
    for path in splits.skipped:
        status.print(f"skipped unreadable image {path}", soft_wrap=True)
    items = "texts" if tokenizer is not None else "images"
    task = f"{len(splits.classes)} classes" if splits.classes else "causal language modelling"
    status.print(
        f"{len(splits.train)} training, {len(splits.val)} validation"
        + (f", {len(splits.test)} test" if splits.test is not None else "")
        + f" {items}, {task}; {result.trainable_parameters:,} trainable parameters",
        soft_wrap=True,
    )
    report = _report_data(result, args.model) if main else None  # before training wraps or shards the model
    summary = run_training(result, splits, config, out, args.resume, settings)
    if report is not None:
        _write_report(out, report, summary)
    return summary


def _report_data(result, model: str) -> dict:
    from utune_fx.report_data import collect
    from utune_fx.rewrite.manifest import read_manifest
    from utune_fx.train.session import checked_artifact_directory

    directory = checked_artifact_directory(model)  # an artifact: its rule files as recorded
    manifest = read_manifest(directory) if directory is not None else None
    return collect(
        result.module, result.base_model, name=result.source.model, kind="train", result=result, manifest=manifest
    )


def _write_report(out, report: dict, summary: dict) -> None:
    """OUT/report.html: the tuned model's page with the training curves of metrics.jsonl."""
    from utune_fx.report_data import read_history
    from utune_fx.report_html import write_report
    from utune_fx.train.rundir import METRICS

    write_report(out / "report.html", report | {"history": read_history(out / METRICS) or [], "summary": summary})


def _print_summary(args: argparse.Namespace, out, summary: dict) -> int:
    if args.json:
        print_json(summary)
        return 0
    test, perplexity = summary.get("test_accuracy"), summary.get("last_val_perplexity")
    kind = "token accuracy" if perplexity is not None else "accuracy"
    print(
        f"best validation {kind} {summary['best_val_accuracy']:.1%} (epoch {summary['best_epoch']}), "
        f"last {summary['last_val_accuracy']:.1%}"
        + (f", perplexity {perplexity:.2f}" if perplexity is not None else "")
        + (f", test {test:.1%}" if test is not None else "")
    )
    print(
        f"{summary['trainable_parameters']:,} trainable parameters, {summary['wall_seconds']:.1f} s "
        f"({summary['seconds_per_epoch']:.1f} s/epoch) on {summary['device']}"
        + (f" x {summary['world_size']} processes" if summary.get("world_size", 1) > 1 else "")
        + ", "
        f"peak memory {summary['peak_memory_bytes'] / 2**20:.0f} MiB"
    )
    if summary.get("features_cached"):
        print(
            f"frozen features cached: {summary['feature_cache_bytes'] / 2**20:.1f} MiB for "
            f"{summary['feature_cache_images']:,} images, built in {summary['feature_cache_seconds']:.1f} s"
        )
    print(f"wrote {out}/ (tuned/, checkpoint/, split.json, metrics.jsonl, summary.json, curves.png, report.html)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from utune_fx.atomic import write_text
    from utune_fx.train.plots import plot_confusion
    from utune_fx.train.session import evaluate_classes, evaluate_tokens, tuned_model
    from utune_fx.train.split import eval_images, plan_eval

    plan = plan_eval(args.directory, args.data, args.split, args.seed, args.tokenizer)  # before the model is built
    result = tuned_model(args.directory, None, None, "auto", base_model=args.base_model)
    dataset, classes, facts = eval_images(result, plan)
    if facts["task"] == "causal-lm":
        report = evaluate_tokens(result.module, dataset) | facts
    else:
        report = evaluate_classes(result.module, dataset, classes) | facts
    out = Path(args.output or args.directory)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "eval.json", json.dumps(report, indent=1))
    if "confusion" in report:
        plot_confusion(report, out / "confusion.png")
    if args.json:
        print_json(report)
        return 0
    if "perplexity" in report:
        print(
            f"{report['split']} texts of {report['data']}: loss {report['loss']:.4f}, perplexity "
            f"{report['perplexity']:.2f}, token accuracy {report['accuracy']:.1%} on {report['images']} texts"
        )
        print(f"wrote {out}/eval.json")
        return 0
    worst = sorted(report["per_class"].items(), key=lambda item: item[1])[:3]
    split = "the run's validation images" if report["split"] == "validation" else "test split"
    print(
        f"{split} of {report['data']}: top-1 {report['top1']:.1%}, top-5 {report['top5']:.1%} "
        f"on {report['images']} images; weakest classes " + ", ".join(f"{c} {a:.0%}" for c, a in worst)
    )
    print(f"wrote {out}/eval.json and {out}/confusion.png")
    return 0


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help="imagefolder:PATH, cifar:PATH, npz:PATH, digits; text: jsonl:PATH?text=F&label=F, "
        "csv:PATH?text=F&label=F, text:PATH (no label: causal LM) (see docs/data.md)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds data selection, order, augmentation")
    _add_tokenizer_flag(parser, "none")
    parser.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        help="text data: tokens per example, padded or truncated; the model is traced at it (default 64)",
    )


def _add_tokenizer_flag(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        help=f"text data: a local Hugging Face tokenizer folder (save_pretrained) (default {default})",
    )


def _share_or_count(text: str) -> float | int:
    """'500' is a count of images, '0.1' a share of them."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    from utune_fx.train import TrainConfig

    defaults = TrainConfig()
    for name, text in TrainConfig.help().items():
        if name == "seed":
            continue
        value = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", help=text)
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"{text} (default {value})")
    parser.add_argument("--shots", type=int, help="training images per class (few-shot)")
    parser.add_argument("--train-size", type=int, help="training images in all (VTAB-1k: 1000)")
    parser.add_argument(
        "--val-size",
        type=_share_or_count,
        default=0.1,
        help="validation share (0.1) or image count (500) (default 0.1)",
    )
    parser.add_argument("--no-augment", action="store_true", help="train on eval transforms (no random crops/flips)")
    parser.add_argument(
        "--skip-bad-images", action="store_true", help="leave unreadable images out instead of stopping"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in -o from its checkpoint")
