"""Command line: parses arguments and calls the library; nothing else.

    python cli.py inspect [MODEL_SPEC] [--input-shape 2,3,224,224] [--frontend auto|fx|export] [--json]

User errors print one line, ``error: ...``, and exit with code 2; ``--debug``
shows the traceback instead.
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
    from utune_fx.specs import load_model
    from utune_fx.trace import trace

    status = Console(stderr=True)
    with status.status(f"building {args.model}"):
        loaded = load_model(args.model, args.input_shape)
    with status.status(f"tracing {args.model}"):
        gm = trace(loaded.model, loaded.inputs, frontend=args.frontend, name=loaded.name)
        report = inspect_graph(gm, loaded.model, loaded.name)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        render(report, Console(width=max(Console().width, 120)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cli.py", description="utune_fx: U-Tuning on torch.fx graphs")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="show what utune_fx sees in a model")
    inspect.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                         help=f"timm:NAME[?opt=v&...], package.module:callable or file.py:callable (default {DEFAULT_MODEL})")
    inspect.add_argument("--input-shape", action="append", metavar="SHAPE[:DTYPE]",
                         help="example input shape, e.g. 2,3,224,224 or 2,16:int64; once per input")
    inspect.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto",
                         help="tracer: torch.fx, torch.export, or fx falling back to export (default)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    inspect.set_defaults(run=_inspect)
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
