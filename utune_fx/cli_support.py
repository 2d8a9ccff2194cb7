"""What the commands of cli.py share: the model arguments, --json and --debug, printing a report as JSON."""

from __future__ import annotations

import argparse
import json
import sys


def add_output_flags(parser: argparse.ArgumentParser, json_help: str) -> None:
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def print_json(report: object) -> None:
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")


def add_model_arguments(parser: argparse.ArgumentParser, default: str | None) -> None:
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
