"""Command line: parses arguments and calls the library; nothing else.

    python cli.py inspect [MODEL_SPEC] [--input-shape 2,3,224,224] [--frontend auto|fx|export] [--json]
    python cli.py match MODEL_SPEC --rules FILE [--explain] [--allow-empty] [--json] [--report FILE.html]
    python cli.py rewrite MODEL_SPEC --rules FILE [--rules FILE2 ...] -o DIR [--allow-empty] [--report FILE.html]
    python cli.py train DIR_OR_MODEL [--rules FILE ...] --data SPEC -o OUT [--epochs N --lr X ...] [--resume] [--allow-empty]
    python cli.py eval DIR [--data SPEC] [--split test|val]
    python cli.py fold DIR -o OUT                   (these three: cli_deploy.py; train, eval: cli_train.py)
    python cli.py export DIR -o model.onnx [--fold] [--opset N] [--tuners-as-inputs]
    python cli.py bench DIR [--batch-sizes 1,32] [-o bench.json]
    python cli.py export DIR --format peft -o ADAPTER_DIR; import-peft ADAPTER_DIR [--model SPEC] -o OUT  (cli_peft.py)
    python cli.py zoo [--catalog timm|transformers|torchvision] [--models ci|all|NAMES] [-o DIR] [--markdown FILE]

User errors print one line, ``error: ...``, and exit with code 2; ``--debug``
shows the traceback instead. ``match`` and ``rewrite`` exit with 3 when a rule
matches nothing (unless ``--allow-empty``); ``match`` exits with 2, and the line
``rewrite`` would fail with, when ``rewrite`` would refuse a region.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from rich.console import Console

from utune_fx.cli_deploy import add_deploy_commands
from utune_fx.cli_peft import add_peft_commands
from utune_fx.cli_support import add_model_arguments, add_output_flags, print_json
from utune_fx.cli_train import add_training_commands
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
    from utune_fx.match import MatchContext, load_rules, match_rules
    from utune_fx.match.report import empty_rules_error, match_report, render_match
    from utune_fx.rewrite.bypass import chain_sizes
    from utune_fx.rewrite.plan import bytes_per_parameter, dry_run_refusal, site_refusal

    rules = load_rules(args.rules)  # before building the model: a bad rule file fails fast
    loaded, gm = _traced(args)
    ctx = MatchContext(gm)
    matched = match_rules(gm, rules, ctx)
    report = match_report(gm, loaded.model, rules, loaded.name, site_refusal, ctx, matched, chain_sizes)  # as rewrite
    refusal = dry_run_refusal([report], bytes_per_parameter(loaded.model))
    report["refusal"] = refusal
    if args.report:  # before the exits below: the page shows empty rules and refusals too
        from utune_fx.report_data import collect
        from utune_fx.report_html import write_report

        data = collect(gm, loaded.model, name=loaded.name, kind="match", match_reports=[report], matches=[matched])
        print(f"wrote {write_report(args.report, data)}", file=sys.stderr)
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
    if args.report:
        from utune_fx.report_data import collect
        from utune_fx.report_html import write_report

        data = collect(result.module, result.base_model, name=args.model, kind="rewrite", result=result)
        print(f"wrote {write_report(args.report, data)}")
    return 0


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
        args.catalog,
        tuple(name.strip() for name in args.rules.split(",")),
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


def _add_report_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--report",
        metavar="FILE.html",
        help="also write one self-contained HTML page: the module tree with the regions coloured by rule, "
        "tuners, parameters",
    )


def build_parser() -> argparse.ArgumentParser:
    import utune_fx
    from utune_fx.rulefiles import shipped_rule_names

    parser = argparse.ArgumentParser(prog=_program_name(), description="utune_fx: U-Tuning on torch.fx graphs")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"utune_fx {utune_fx.__version__}")
    rules_help = f"rule file (YAML path), or a shipped one by name: {', '.join(shipped_rule_names())}"
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="show what utune_fx sees in a model")
    add_model_arguments(inspect, DEFAULT_MODEL)
    inspect.set_defaults(run=_inspect)

    match = commands.add_parser("match", help="dry run: which regions each rule of a rule file selects")
    add_model_arguments(match, None)
    match.add_argument("--rules", required=True, metavar="FILE", help=rules_help)
    match.add_argument(
        "--explain",
        action="store_true",
        help="show candidates, selection and dropped overlaps, and the closest near-miss of empty rules",
    )
    match.add_argument("--allow-empty", action="store_true", help="exit 0 even if a rule matches nothing")
    _add_report_flag(match)
    match.set_defaults(run=_match)

    rewrite = commands.add_parser("rewrite", help="insert the tuners the rules name; write a tuned artifact")
    add_model_arguments(rewrite, None)
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
    _add_report_flag(rewrite)
    rewrite.set_defaults(run=_rewrite)

    add_training_commands(commands, rules_help)
    add_deploy_commands(commands)
    add_peft_commands(commands)

    zoo = commands.add_parser(
        "zoo", help="a catalogue of models (timm, transformers, torchvision) through the whole chain"
    )
    zoo.add_argument("--catalog", default="timm", choices=("timm", "transformers", "torchvision"))
    zoo.add_argument("--models", default="ci", help="ci (the fixed sample), all (the whole catalogue), or names")
    zoo.add_argument(
        "-o",
        "--output",
        default="runs/zoo",
        metavar="DIR",
        help="results.jsonl (resumable), report.json (default runs/zoo)",
    )
    zoo.add_argument("--markdown", metavar="FILE", help="where the table goes (default DIR/coverage.md)")
    zoo.add_argument(
        "--rules",
        default="dual_utuner,lora",
        metavar="NAMES",
        help="shipped rule files, comma-separated, applied in order (default dual_utuner,lora; the ground-truth "
        "counts are checked for that pair only)",
    )
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
