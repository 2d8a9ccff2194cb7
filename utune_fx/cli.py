"""Command line: parses arguments and calls the library; nothing else.

    python cli.py inspect [MODEL_SPEC] [--input-shape 2,3,224,224] [--frontend auto|fx|export] [--json]
    python cli.py match MODEL_SPEC --rules FILE [--explain] [--allow-empty] [--json]
    python cli.py rewrite MODEL_SPEC --rules FILE [--rules FILE2 ...] -o DIR

User errors print one line, ``error: ...``, and exit with code 2; ``--debug``
shows the traceback instead. ``match`` exits with 3 when a rule matches
nothing (unless ``--allow-empty``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from rich.console import Console

from utune_fx.errors import EXIT_USER_ERROR, UtuneError
from utune_fx.specs import DEFAULT_MODEL


def _inspect(args: argparse.Namespace) -> int:
    from utune_fx.inspection import inspect_graph, render

    loaded, gm = _traced(args)
    report = inspect_graph(gm, loaded.model, loaded.name)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
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
    from utune_fx.match.report import match_report, render_match

    rules = load_rules(args.rules)  # before building the model: a bad rule file fails fast
    loaded, gm = _traced(args)
    report = match_report(gm, loaded.model, rules, loaded.name)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        render_match(report, Console(width=max(Console().width, 120)), args.explain)
    if report["empty_rules"] and not args.allow_empty:
        print(f"error: rule(s) {', '.join(report['empty_rules'])} in {args.rules} match nothing in {loaded.name}; "
              "see --explain, or pass --allow-empty", file=sys.stderr)
        return EXIT_EMPTY_RULE
    return 0


def _rewrite(args: argparse.Namespace) -> int:
    from utune_fx.match import load_rules
    from utune_fx.rewrite import rewrite
    from utune_fx.rewrite.artifact import TunedSource, save_tuned
    from utune_fx.rewrite.report import render_rewrite

    rule_sets = [load_rules(path) for path in args.rules]
    loaded, gm = _traced(args)
    result = rewrite(gm, rule_sets)
    out = save_tuned(result, rule_sets, TunedSource(args.model, args.input_shape or [], args.frontend), args.output)
    render_rewrite(result, loaded.name, Console(width=max(Console().width, 120)))
    print(f"wrote {out}/ (manifest.json, tuners.safetensors)")
    return 0


def _add_model_arguments(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("model", nargs="?" if default else None, default=default,
                        help="timm:NAME[?opt=v&...], package.module:callable or file.py:callable"
                        + (f" (default {default})" if default else ""))
    parser.add_argument("--input-shape", action="append", metavar="SHAPE[:DTYPE]",
                        help="example input shape, e.g. 2,3,224,224 or 2,16:int64; once per input")
    parser.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto",
                        help="tracer: torch.fx, torch.export, or fx falling back to export (default)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cli.py", description="utune_fx: U-Tuning on torch.fx graphs")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="show what utune_fx sees in a model")
    _add_model_arguments(inspect, DEFAULT_MODEL)
    inspect.set_defaults(run=_inspect)

    match = commands.add_parser("match", help="dry run: which regions each rule of a rule file selects")
    _add_model_arguments(match, None)
    match.add_argument("--rules", required=True, metavar="FILE", help="rule file (YAML), e.g. rules/dual_utuner.yaml")
    match.add_argument("--explain", action="store_true",
                       help="show candidates, selection and dropped overlaps, and the closest near-miss of empty rules")
    match.add_argument("--allow-empty", action="store_true", help="exit 0 even if a rule matches nothing")
    match.set_defaults(run=_match)

    rewrite = commands.add_parser("rewrite", help="insert the tuners the rules name; write a tuned artifact")
    _add_model_arguments(rewrite, None)
    rewrite.add_argument("--rules", required=True, action="append", metavar="FILE",
                         help="rule file (YAML); repeat to apply several, in order")
    rewrite.add_argument("-o", "--output", required=True, metavar="DIR", help="directory for the tuned artifact")
    rewrite.set_defaults(run=_rewrite)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UtuneError as error:
        if args.debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
