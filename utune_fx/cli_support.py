"""What every command of cli.py shares: --json and --debug, and printing a report as JSON."""

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
