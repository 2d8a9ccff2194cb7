"""Command line: parses arguments and calls the library; nothing else.

    python cli.py inspect [MODEL_SPEC] [--input-shape 2,3,224,224] [--frontend auto|fx|export] [--json]
    python cli.py match MODEL_SPEC --rules FILE [--explain] [--allow-empty] [--json]
    python cli.py rewrite MODEL_SPEC --rules FILE [--rules FILE2 ...] -o DIR [--allow-empty]
    python cli.py train DIR_OR_MODEL [--rules FILE ...] --data SPEC -o OUT [--epochs N --lr X ...] [--resume] [--allow-empty]
    python cli.py eval DIR --data SPEC [--split test|val]
    python cli.py fold DIR -o OUT                   (these three: cli_deploy.py)
    python cli.py export DIR -o model.onnx [--fold] [--opset N] [--tuners-as-inputs]
    python cli.py bench DIR [--batch-sizes 1,32] [-o bench.json]
    python cli.py zoo [--models ci|all|NAMES] [-o DIR] [--markdown docs/coverage.md]

User errors print one line, ``error: ...``, and exit with code 2; ``--debug``
shows the traceback instead. ``match`` and ``rewrite`` exit with 3 when a rule
matches nothing (unless ``--allow-empty``); ``match`` exits with 2, and the line
``rewrite`` would fail with, when ``rewrite`` would refuse a region.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from rich.console import Console

from utune_fx.cli_deploy import add_base_model_flag, add_deploy_commands
from utune_fx.cli_support import add_output_flags, print_json
from utune_fx.errors import EXIT_USER_ERROR, UtuneError
from utune_fx.specs import DEFAULT_MODEL, with_weights


def _inspect(args: argparse.Namespace) -> int:
    from utune_fx.inspection import inspect_graph, render

    loaded, gm = _traced(args)
    report = inspect_graph(gm, loaded.model, loaded.name)
    if args.json:
        print_json(report)
    else:
        render(report, Console(width=max(Console().width, 120)))
    return 0


EXIT_EMPTY_RULE = 3


def _traced(args: argparse.Namespace):
    from utune_fx.specs import load_model
    from utune_fx.trace import trace

    status = Console(stderr=True)
    with status.status(f"building {args.model}"):
        loaded = load_model(args.model, args.input_shape)
    with status.status(f"tracing {args.model}"):
        gm = trace(loaded.model, loaded.inputs, frontend=args.frontend, name=loaded.name)
    return loaded, gm


def _match(args: argparse.Namespace) -> int:
    from utune_fx.match import load_rules
    from utune_fx.match.report import empty_rules_error, match_report, render_match
    from utune_fx.rewrite.plan import bytes_per_parameter, dry_run_refusal, site_refusal

    rules = load_rules(args.rules)  # before building the model: a bad rule file fails fast
    loaded, gm = _traced(args)
    report = match_report(gm, loaded.model, rules, loaded.name, site_refusal)  # the checks rewrite runs
    refusal = dry_run_refusal([report], bytes_per_parameter(loaded.model))
    report["refusal"] = refusal
    if args.json:
        print_json(report)
    else:
        render_match(report, Console(width=max(Console().width, 120)), args.explain)
    if refusal is not None:  # what rewrite would refuse with, the same line
        print(f"error: {refusal}", file=sys.stderr)
        return EXIT_USER_ERROR
    if report["empty_rules"] and not args.allow_empty:
        empty = [(rules.path, name) for name in report["empty_rules"]]
        print(f"error: {empty_rules_error(empty, loaded.name)}", file=sys.stderr)
        return EXIT_EMPTY_RULE
    return 0


def _rewrite(args: argparse.Namespace) -> int:
    from utune_fx.match import load_rules
    from utune_fx.match.report import empty_rules_error
    from utune_fx.rewrite.artifact import TunedSource, build_tuned, save_tuned
    from utune_fx.rewrite.report import render_rewrite

    rule_sets = [load_rules(path) for path in args.rules]  # before building the model: bad rules fail fast
    with Console(stderr=True).status(f"building, tracing and rewriting {args.model}"):
        result = build_tuned(TunedSource(args.model, args.input_shape or [], args.frontend), rule_sets)
    if result.empty_rules and not args.allow_empty:  # as match does; nothing is written
        print(f"error: {empty_rules_error(result.empty_rules, args.model)}", file=sys.stderr)
        return EXIT_EMPTY_RULE
    out = save_tuned(result, rule_sets, result.source, args.output)
    render_rewrite(result, args.model, Console(width=max(Console().width, 120)))
    print(f"wrote {out}/ (manifest.json, tuners.safetensors)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from utune_fx.train import TrainConfig
    from utune_fx.train.rundir import open_run
    from utune_fx.train.session import cli_settings

    config = TrainConfig(**{name: getattr(args, name) for name in TrainConfig.help()})  # checked (device too) first
    out = Path(args.output)
    settings = cli_settings(args, config)
    # before any work: OUT locked for this run, a killed swap repaired, --resume held to the run's settings
    with open_run(out, args.resume, settings) as notices:
        for notice in notices:
            Console(stderr=True).print(f"resuming {out} with {notice}", soft_wrap=True)
        summary = _train_locked(args, config, out, settings)
    return _print_summary(args, out, summary)


def _train_locked(args: argparse.Namespace, config, out, settings: dict) -> dict:
    """Build the model, read the data, train: what runs while OUT is locked."""
    from utune_fx.train.session import load_splits, run_training, tuned_model

    status = Console(stderr=True)
    with status.status(f"building {args.model}"):
        result = tuned_model(
            args.model, args.rules, args.input_shape, args.frontend, args.seed, base_model=args.base_model
        )
    if args.rules and result.empty_rules and not args.allow_empty:  # as match and rewrite do, before training
        from utune_fx.errors import EmptyRuleError
        from utune_fx.match.report import empty_rules_error

        raise EmptyRuleError(empty_rules_error(result.empty_rules, args.model))
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
        )
    if not args.json:
        from utune_fx.rewrite.report import render_rewrite

        render_rewrite(result, result.source.model, Console(width=max(Console().width, 120)))
    for path in splits.skipped:
        status.print(f"skipped unreadable image {path}", soft_wrap=True)
    status.print(
        f"{len(splits.train)} training, {len(splits.val)} validation"
        + (f", {len(splits.test)} test" if splits.test is not None else "")
        + f" images, "
        f"{len(splits.classes)} classes; {result.trainable_parameters:,} trainable parameters",
        soft_wrap=True,
    )
    return run_training(result, splits, config, out, args.resume, settings)


def _print_summary(args: argparse.Namespace, out, summary: dict) -> int:
    if args.json:
        print_json(summary)
        return 0
    test = summary.get("test_accuracy")
    print(
        f"best validation accuracy {summary['best_val_accuracy']:.1%} (epoch {summary['best_epoch']}), "
        f"last {summary['last_val_accuracy']:.1%}" + (f", test {test:.1%}" if test is not None else "")
    )
    print(
        f"{summary['trainable_parameters']:,} trainable parameters, {summary['wall_seconds']:.1f} s "
        f"({summary['seconds_per_epoch']:.1f} s/epoch) on {summary['device']}, "
        f"peak memory {summary['peak_memory_bytes'] / 2**20:.0f} MiB"
    )
    print(f"wrote {out}/ (tuned/, checkpoint/, metrics.jsonl, summary.json, curves.png)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from utune_fx.atomic import write_text
    from utune_fx.train.plots import plot_confusion
    from utune_fx.train.session import evaluate_classes, load_splits, tuned_model

    result = tuned_model(args.directory, None, None, "auto", base_model=args.base_model)
    splits = load_splits(result, args.data, seed=args.seed, augment=False)
    dataset = splits.test if args.split == "test" and splits.test is not None else splits.val
    split = "test" if dataset is splits.test else "validation"
    report = evaluate_classes(result.module, dataset, splits.classes) | {"split": split, "data": args.data}
    out = Path(args.output or args.directory)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "eval.json", json.dumps(report, indent=1))
    plot_confusion(report, out / "confusion.png")
    if args.json:
        print_json(report)
        return 0
    worst = sorted(report["per_class"].items(), key=lambda item: item[1])[:3]
    print(
        f"{split} split of {args.data}: top-1 {report['top1']:.1%}, top-5 {report['top5']:.1%} "
        f"on {report['images']} images; weakest classes " + ", ".join(f"{c} {a:.0%}" for c, a in worst)
    )
    print(f"wrote {out}/eval.json and {out}/confusion.png")
    return 0


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help="imagefolder:PATH, cifar:PATH, npz:PATH or digits (see docs/data.md)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds data selection, order, augmentation")


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


def _add_model_arguments(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument(
        "model",
        nargs="?" if default else None,
        default=default,
        help="timm:NAME[?opt=v&...], card.json, package.module:callable or file.py:callable"
        + (f" (default {default})" if default else ""),
    )
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="pretrained weights (.safetensors) for a timm or card "
        "model; same as ?weights=FILE in the spec, so artifacts record them",
    )
    parser.add_argument(
        "--input-shape",
        action="append",
        metavar="SHAPE[:DTYPE]",
        help="example input shape, e.g. 2,3,224,224 or 2,16:int64; once per input",
    )
    parser.add_argument(
        "--frontend",
        choices=("auto", "fx", "export"),
        default="auto",
        help="tracer: torch.fx, torch.export, or fx falling back to export (default)",
    )
    add_output_flags(parser, "print the report as JSON")


def _zoo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from utune_fx.zoo import run_zoo

    report = run_zoo(
        args.models,
        Path(args.output),
        args.jobs,
        args.timeout,
        args.memory_gb,
        Path(args.markdown) if args.markdown else None,
    )
    if args.json:
        print_json({k: v for k, v in report.items() if k != "rows"})
        return 0
    for stage, (passed, total) in report["pass_rates"].items():
        print(f"{stage:<9} {passed:>4} / {total:<4} {100 * passed / max(total, 1):5.1f}%")
    for cause in report["causes"][:10]:
        print(f"{cause['count']:>4}  {cause['cause']}")
    print(f"wrote {args.output}/results.jsonl, report.json and {args.markdown or args.output + '/coverage.md'}")
    return 0


def _program_name() -> str:
    """How the user called us, for usage lines: the console script or ``python cli.py``."""
    return "utune-fx" if os.path.basename(sys.argv[0]).startswith("utune-fx") else "cli.py"


def build_parser() -> argparse.ArgumentParser:
    import utune_fx
    from utune_fx.rulefiles import shipped_rule_names

    parser = argparse.ArgumentParser(prog=_program_name(), description="utune_fx: U-Tuning on torch.fx graphs")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"utune_fx {utune_fx.__version__}")
    rules_help = f"rule file (YAML path), or a shipped one by name: {', '.join(shipped_rule_names())}"
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="show what utune_fx sees in a model")
    _add_model_arguments(inspect, DEFAULT_MODEL)
    inspect.set_defaults(run=_inspect)

    match = commands.add_parser("match", help="dry run: which regions each rule of a rule file selects")
    _add_model_arguments(match, None)
    match.add_argument("--rules", required=True, metavar="FILE", help=rules_help)
    match.add_argument(
        "--explain",
        action="store_true",
        help="show candidates, selection and dropped overlaps, and the closest near-miss of empty rules",
    )
    match.add_argument("--allow-empty", action="store_true", help="exit 0 even if a rule matches nothing")
    match.set_defaults(run=_match)

    rewrite = commands.add_parser("rewrite", help="insert the tuners the rules name; write a tuned artifact")
    _add_model_arguments(rewrite, None)
    rewrite.add_argument(
        "--rules",
        required=True,
        action="append",
        metavar="FILE",
        help=f"{rules_help}; repeat to apply several, in order",
    )
    rewrite.add_argument("-o", "--output", required=True, metavar="DIR", help="directory for the tuned artifact")
    rewrite.add_argument(
        "--allow-empty", action="store_true", help="write the artifact even if a rule matches nothing (else exit 3)"
    )
    rewrite.set_defaults(run=_rewrite)

    train = commands.add_parser("train", help="train a tuned model (an artifact, or a model spec with --rules)")
    _add_model_arguments(train, None)
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
    evaluate.add_argument("directory", metavar="DIR", help="a training run (OUT) or a tuned artifact")
    _add_data_arguments(evaluate)
    evaluate.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="the source's test split (default; validation when it has none) or validation",
    )
    evaluate.add_argument("-o", "--output", metavar="DIR", help="where eval.json and confusion.png go (default DIR)")
    add_base_model_flag(evaluate)
    add_output_flags(evaluate, "print the report as JSON")
    evaluate.set_defaults(run=_eval)

    add_deploy_commands(commands)

    zoo = commands.add_parser("zoo", help="every timm architecture family through the whole chain")
    zoo.add_argument("--models", default="ci", help="ci (the fixed sample), all (one per timm family), or names")
    zoo.add_argument(
        "-o",
        "--output",
        default="runs/zoo",
        metavar="DIR",
        help="results.jsonl (resumable), report.json (default runs/zoo)",
    )
    zoo.add_argument("--markdown", metavar="FILE", help="where the table goes (default DIR/coverage.md)")
    zoo.add_argument("--jobs", type=int, default=2, help="models at a time (default 2)")
    zoo.add_argument("--timeout", type=float, default=600, help="seconds per model (default 600)")
    zoo.add_argument("--memory-gb", type=float, default=10, help="address space per model (default 10)")
    add_output_flags(zoo, "print the pass rates and causes as JSON")
    zoo.set_defaults(run=_zoo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "weights", None):
            args.model = with_weights(args.model, args.weights)
        return args.run(args)
    except UtuneError as error:
        if args.debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
