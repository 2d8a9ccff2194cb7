"""The hostile inputs of issue 15, one :class:`Case` each, grouped by the issue's probe categories.

    for case in CASES:
        argv = case.build(folder, workspace)      # writes the case's files under folder
        kind = judge(case, outcome, folder)      # "clean" or a failure kind (bounded.FAILURE_KINDS)

tests/test_hostile_corpus.py runs every case in-process (a forked child, bounded);
benchmarks/hostile_probe.py runs them through ``python cli.py`` and counts the kinds per category.
Large inputs are generated here, never stored. Every promise a case checks is the issue's:
``must_fail`` cases must be refused (exit 2, or ``exit_code``), ``must_succeed`` ones must work.
"""

from __future__ import annotations

from hostile import files  # noqa: F401  (re-exported: tests build sane rule files with it)
from hostile.case import CATEGORIES, MARKER, Case, judge  # noqa: F401
from hostile.file_cases import (
    CODE,
    CODE_RESUME,
    CONTROLS,
    DEVICES,
    INPUT_TRACEBACKS,
    INSTALLS,
    PARITY,
    PICKLES,
    RESUME,
    SECOND_WRITER,
    SPECIAL_FILES,
    start_first_writer,
)
from hostile.rule_cases import HANGS, RULE_TRACEBACKS, WRONG

CASES = [*CODE, *CODE_RESUME, *PICKLES, *HANGS, *RULE_TRACEBACKS, *INPUT_TRACEBACKS, *SPECIAL_FILES, *WRONG, *PARITY,
         *RESUME, *INSTALLS, *DEVICES]  # fmt: skip
assert len({case.name for case in CASES}) == len(CASES), "case names are test ids"
__all__ = ["CASES", "CATEGORIES", "CONTROLS", "MARKER", "Case", "SECOND_WRITER", "judge", "start_first_writer"]
