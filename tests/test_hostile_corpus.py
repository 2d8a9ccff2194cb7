"""The hostile inputs of issue 15 (tests/hostile/corpus.py) through the CLI: each ends cleanly.

Clean is exit 0, or exit 2 (3: a rule that matches nothing) with exactly one ``error:`` line
and no traceback; cases the issue says must be refused are refused, cases that must work
work, and an artifact never runs the code its manifest names. Each case runs ``cli.main``
in a forked child with a deadline and a memory bound (tests/hostile/bounded.py), so a hang
or a blow-up is a failing case, not a stuck or killed test run.
"""

import pytest
from hostile import corpus
from hostile.bounded import CLEAN, run_bounded
from hostile.workspace import Workspace

from utune_fx.cli import main

# A hang is minutes and a blow-up gigabytes; the promise is 2 s and 500 MB on a quiet machine.
# The deadlines leave room for CI machines shared with other jobs.
BOUNDED_DEADLINE_S, DEADLINE_S, MEMORY_MB = 30, 120, 500


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    workspace = Workspace(tmp_path_factory.mktemp("hostile"))
    workspace.artifact(workspace.root / "warm-up")  # builds the originals; imports timm before the forks
    workspace.run(workspace.root / "warm-up-run")
    return workspace


def _short(argv: list[str]) -> str:
    return " ".join(arg if len(arg) < 120 else arg[:60] + "..." for arg in argv)


@pytest.mark.parametrize("case", corpus.CASES, ids=[f"{c.category}-{c.name}" for c in corpus.CASES])
def test_a_hostile_input_ends_cleanly(case, space, tmp_path):
    argv = case.build(tmp_path, space)
    deadline = BOUNDED_DEADLINE_S if case.bounded else DEADLINE_S
    outcome = run_bounded(lambda: main(argv), timeout_s=deadline, memory_mb=MEMORY_MB, cwd=tmp_path)
    kind = corpus.judge(case, outcome, tmp_path, MEMORY_MB)
    assert kind == CLEAN, f"{kind}: cli.py {_short(argv)} -> {outcome.describe()}"


def test_a_second_writer_into_one_run_directory_is_refused(space, tmp_path):
    first, argv = corpus.start_first_writer(tmp_path)
    try:
        assert first.poll() is None, f"the first run ended early: {first.stderr.read().decode()[-500:]}"
        outcome = run_bounded(lambda: main(argv), timeout_s=DEADLINE_S, memory_mb=MEMORY_MB, cwd=tmp_path)
    finally:
        first.kill()
        first.wait()
    kind = corpus.judge(corpus.SECOND_WRITER, outcome, tmp_path)
    assert kind == CLEAN, f"{kind}: a second train into {tmp_path / 'out'} -> {outcome.describe()}"


@pytest.mark.parametrize("case", corpus.CONTROLS, ids=[c.name for c in corpus.CONTROLS])
def test_the_inputs_the_cases_damage_work_undamaged(case, space, tmp_path):
    """So that every refusal above is for the hostile value, not a broken setup (or a broken reseal)."""
    argv = case.build(tmp_path, space)
    outcome = run_bounded(lambda: main(argv), timeout_s=DEADLINE_S, memory_mb=MEMORY_MB, cwd=tmp_path)
    assert corpus.judge(case, outcome, tmp_path, MEMORY_MB) == CLEAN, outcome.describe()
