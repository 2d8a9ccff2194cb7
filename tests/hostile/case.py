"""A hostile case: what it builds, what the issue promises about it, and how an outcome is judged.

Case(category, name, build, must_fail=..., must_succeed=..., exit_code=..., expect=..., bounded=...)
judge(case, outcome, folder)        "clean" or a failure kind (bounded.FAILURE_KINDS, "wrong refusal")
through_cli(text, "match")          a build: the tiny model's match (or rewrite) on a rule file
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hostile.bounded import CLEAN, Outcome, classify
from hostile.workspace import SPEC, Workspace

CATEGORIES = {
    1: "code execution from an artifact",
    2: "hangs and memory blow-ups from rule files",
    3: "tracebacks",
    4: "wrong successes",
    5: "resume trusts what it is given",
    6: "installs",
    7: "devices",
}
MARKER = "MARKER"


@dataclass
class Case:
    category: int
    name: str
    build: Callable[[Path, Workspace], list[str]]  # writes files under the case folder, returns the CLI argv
    must_fail: bool = False
    must_succeed: bool = False
    exit_code: int | None = None  # the exact non-zero code the promise names
    expect: str | None = None  # a regex the output must hold
    bounded: bool = False  # a hang or memory input: the work bound is what is tested


def judge(case: Case, outcome: Outcome, folder: Path, memory_mb: float = 500) -> str:
    kind = classify(outcome, must_fail=case.must_fail, memory_mb=memory_mb, marker=folder / MARKER)
    if kind != CLEAN:
        return kind
    if case.must_succeed and outcome.returncode != 0:
        return "wrong refusal"
    if case.exit_code is not None and outcome.returncode != case.exit_code:
        return "wrong success" if outcome.returncode == 0 else "wrong refusal"
    if case.expect and not re.search(case.expect, outcome.stdout + outcome.stderr):
        return "wrong success" if outcome.returncode == 0 else "wrong refusal"
    return CLEAN


def rules_file(folder: Path, text: str, name: str = "rules.yaml") -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


def through_cli(text: str, command: str = "match") -> Callable[[Path, Workspace], list[str]]:
    """A case that runs ``match`` (or ``rewrite``) of the tiny model on a rule file."""

    def build(folder: Path, space: Workspace) -> list[str]:
        argv = [command, SPEC, "--rules", rules_file(folder, text)]
        return argv + (["-o", str(folder / "out")] if command == "rewrite" else [])

    return build


def argv_of(*argv: str) -> Callable[[Path, Workspace], list[str]]:
    return lambda folder, space: [a.replace("{dir}", str(folder)) for a in argv]
