"""Run one call under a time and a memory bound, in a forked child, and say how it ended.

    outcome = run_bounded(lambda: main(argv), timeout_s=30, memory_mb=500)
    outcome.kind      # "clean", "traceback", "unclean output", "hang", "memory", "wrong success", "code executed"

A fork costs milliseconds where a fresh ``python cli.py`` costs seconds (torch and timm
imports), and it isolates what an in-process call cannot: a C-level hang (a regex that
backtracks) is killed at the deadline, an allocation beyond the bound fails in the child
(RLIMIT_AS), and a crash never takes the test process down. The child runs torch with one
thread: GNU OpenMP's pool does not survive a fork.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import resource
import select
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# How a run can end; the probe's table has one column per failure kind.
CLEAN = "clean"
FAILURE_KINDS = ("traceback", "unclean output", "hang", "memory", "wrong success", "code executed")
# One line a person reads: a value the input made huge (a 100,000-character name, an alias-expanded
# mapping, a megabyte header field) is cut, not echoed back whole.
MAX_ERROR_LINE = 2000
_ALLOCATION_FAILURES = ("MemoryError", "can't allocate memory", "std::bad_alloc", "Cannot allocate memory")
# Headroom of address space above the parent's, on top of the bound the test asks for: thread
# stacks and allocator arenas reserve address space they never touch.
_ADDRESS_HEADROOM_MB = 1024


@dataclass
class Outcome:
    returncode: int | None  # None: the call never returned (killed, or it raised)
    stdout: str = ""
    stderr: str = ""
    exception: str = ""  # the traceback of anything but SystemExit that escaped the call
    timed_out: bool = False
    rss_growth_mb: float = 0.0
    seconds: float = 0.0
    signal: int | None = None
    notes: list[str] = field(default_factory=list)

    def error_lines(self) -> list[str]:
        """The lines that report an error: ours (``error: ...``) and argparse's (``prog: error: ...``)."""
        return [line for line in self.stderr.splitlines() if re.match(r"^([^:]+: )?error: ", line)]

    def describe(self) -> str:
        """A short text for reports: exit code and the last lines of the output."""
        lines = (self.exception or self.stderr or self.stdout).strip().splitlines()[-3:]
        tail = " | ".join(line if len(line) <= 300 else f"{line[:300]}... ({len(line):,} characters)" for line in lines)
        return f"exit {self.returncode}{' (timed out)' if self.timed_out else ''}: {tail}"


def classify(outcome: Outcome, *, must_fail: bool = False, memory_mb: float = 500, marker: Path | None = None) -> str:
    """The kind of end: clean, or the first failure that applies (most severe first).

    Clean is exit 0 (unless ``must_fail``) or exit 2/3 with exactly one error line (of at most
    MAX_ERROR_LINE characters) and no traceback.
    """
    if marker is not None and marker.exists():
        return "code executed"
    text = outcome.exception + outcome.stderr + outcome.stdout
    allocation = any(sign in text for sign in _ALLOCATION_FAILURES)  # an allocation the bound (or RAM) refused
    if outcome.timed_out:
        return "hang"
    if outcome.rss_growth_mb > memory_mb:
        return "memory"
    if outcome.signal is not None:  # killed from outside (the OOM killer) or crashed in C
        return "memory" if outcome.signal == signal.SIGKILL else "traceback"
    if outcome.exception or "Traceback (most recent call last)" in text:
        return "memory" if allocation else "traceback"
    if outcome.returncode == 0:
        return "wrong success" if must_fail else CLEAN
    lines = outcome.error_lines()
    if outcome.returncode in (2, 3) and len(lines) == 1 and len(lines[0]) <= MAX_ERROR_LINE:
        return CLEAN  # a refused allocation said in one line is clean: the bound held
    return "memory" if allocation else "unclean output"


def keep_ends(text: str, keep: int = 10_000) -> str:
    """The start and the end of a long output (an error line starts it, a traceback ends it)."""
    return text if len(text) <= 2 * keep else text[:keep] + "\n[...]\n" + text[-keep:]


def _vm_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _child(call: Callable[[], int | None], write_end: int, cwd: Path | None, memory_mb: float) -> None:
    """In the forked child: bound memory, run the call with captured output, send the result."""
    report: dict = {"returncode": None, "stdout": "", "stderr": "", "exception": ""}
    try:
        import torch

        torch.set_num_threads(1)
        limit = (_vm_kb("VmSize") + (memory_mb + _ADDRESS_HEADROOM_MB) * 1024) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if cwd is not None:
            os.chdir(cwd)
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    returned = call()
                    report["returncode"] = 0 if returned is None else int(returned)
                except SystemExit as exit_:  # argparse's usage errors
                    report["returncode"] = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: B036 - every escape is what the test is looking for
            report["exception"] = traceback.format_exc()[-6000:]
        report["stdout"], report["stderr"] = keep_ends(out.getvalue()), keep_ends(err.getvalue())
    except BaseException:  # noqa: B036
        report["exception"] = traceback.format_exc()[-6000:]
    data = json.dumps(report).encode()
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(write_end, data) :]
    os._exit(0)


def run_bounded(
    call: Callable[[], int | None], timeout_s: float = 30, memory_mb: float = 500, cwd: Path | None = None
) -> Outcome:
    """Run ``call`` (returning an exit code) in a forked child: killed at ``timeout_s``,
    address space limited to the parent's plus ``memory_mb`` and some headroom."""
    rss_before_kb = _vm_kb("VmRSS")
    read_end, write_end = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        os.close(read_end)
        _child(call, write_end, cwd, memory_mb)
    os.close(write_end)
    chunks, timed_out = [], False
    deadline = started + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            break
        ready, _, _ = select.select([read_end], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(read_end)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.monotonic() - started
    try:
        report = json.loads(b"".join(chunks).decode()) if chunks else {}
    except ValueError:
        report = {}
    outcome = Outcome(
        returncode=report.get("returncode"),
        stdout=report.get("stdout", ""),
        stderr=report.get("stderr", ""),
        exception=report.get("exception", ""),
        timed_out=timed_out,
        rss_growth_mb=max(0.0, (usage.ru_maxrss - rss_before_kb) / 1024),
        seconds=seconds,
        signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) and not timed_out else None,
    )
    if not report and not timed_out:
        outcome.notes.append(f"the child ended without a report (status {status})")
    return outcome
