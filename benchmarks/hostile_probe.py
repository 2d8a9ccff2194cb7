"""Re-run the probe of issue 15: every hostile input of tests/hostile/corpus.py through the real CLI.

    python benchmarks/hostile_probe.py [--timeout 60] [--memory-gb 4] [--jobs 2] [--categories 1,2] [-o probe.jsonl]

Each input runs as its own ``python cli.py ...`` process in its own folder (the folder is the
working directory, so ``--rules lora`` is resolved from elsewhere than the repository), with a
deadline, an address-space limit (RLIMIT_AS) and its peak resident memory read from the kernel
(VmHWM, polled). The table counts, per category of the issue, the inputs handled cleanly (exit 0, or
exit 2/3 with exactly one ``error:`` line and no traceback; refusals where the issue promises
one) and each way of failing: traceback, unclean output, hang (deadline), memory (over the
bound, or killed), wrong success, wrong refusal, code executed (the marker file an artifact's
model spec would touch exists). The failing inputs follow the table, with the end of their output.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from hostile import corpus  # noqa: E402  (tests/ holds the corpus; the probe is its other runner)
from hostile.bounded import CLEAN, FAILURE_KINDS, Outcome, keep_ends  # noqa: E402
from hostile.workspace import SPEC, Workspace  # noqa: E402

KINDS = (*FAILURE_KINDS, "wrong refusal")


def _high_water_kb(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM). Read from /proc while it runs: the rusage of a
    child counts the memory of the process it was forked from, which here is the probe itself."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_cli(argv: list[str], cwd: Path, timeout_s: float, memory_bytes: int) -> tuple[Outcome, float]:
    """``python cli.py argv`` in ``cwd``: the outcome and the peak resident memory in MB."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    out, err = cwd / ".probe-stdout", cwd / ".probe-stderr"
    started = time.monotonic()
    with out.open("wb") as stdout, err.open("wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(REPO / "cli.py"), *argv], cwd=cwd, stdout=stdout, stderr=stderr, preexec_fn=limit
        )
        timed_out, peak_kb = False, 0
        while True:
            peak_kb = max(peak_kb, _high_water_kb(child.pid))
            pid, status, _ = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - started > timeout_s:
                timed_out = True
                child.send_signal(signal.SIGKILL)
                _, status, _ = os.wait4(child.pid, 0)
                break
            time.sleep(0.05)
        child.returncode = 0  # reaped by wait4 above; Popen must not wait again
    outcome = Outcome(
        returncode=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        stdout=keep_ends(out.read_text(errors="replace")),
        stderr=keep_ends(err.read_text(errors="replace")),
        timed_out=timed_out,
        seconds=time.monotonic() - started,
        signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) and not timed_out else None,
    )
    return outcome, peak_kb / 1024


def prepare(case: corpus.Case, folder: Path, space: Workspace) -> list[str]:
    """The case's files and argv; in the main thread (a build may train in-process, which sets signal handlers)."""
    folder.mkdir(parents=True)
    return [] if case is corpus.SECOND_WRITER else case.build(folder, space)


def probe(case: corpus.Case, folder: Path, argv: list[str], args, baseline_mb: float) -> dict:
    if case is corpus.SECOND_WRITER:
        first, argv = corpus.start_first_writer(folder)
        try:
            outcome, peak = run_cli(argv, folder, args.timeout, int(args.memory_gb * 2**30))
        finally:
            first.kill()
            first.wait()
    else:
        outcome, peak = run_cli(argv, folder, args.timeout, int(args.memory_gb * 2**30))
    outcome.rss_growth_mb = max(0.0, peak - baseline_mb)
    kind = corpus.judge(case, outcome, folder, args.memory_mb)
    return {
        "category": case.category,
        "case": case.name,
        "kind": kind,
        "exit": outcome.returncode,
        "seconds": round(outcome.seconds, 1),
        "peak_mb": round(peak),
        "argv": " ".join(a if len(a) < 100 else a[:50] + "..." for a in argv),
        "output": outcome.describe(),
    }


def table(rows: list[dict]) -> str:
    lines = [f"{'category':<46} {'inputs':>6} {'clean':>5} " + " ".join(f"{k:>{max(len(k), 5)}}" for k in KINDS)]
    for number, title in corpus.CATEGORIES.items():
        kinds = Counter(row["kind"] for row in rows if row["category"] == number)
        total = sum(kinds.values())
        if total:
            cells = " ".join(f"{kinds[k]:>{max(len(k), 5)}}" for k in KINDS)
            lines.append(f"{f'{number}. {title}':<46} {total:>6} {kinds[CLEAN]:>5} {cells}")
    kinds = Counter(row["kind"] for row in rows)
    cells = " ".join(f"{kinds[k]:>{max(len(k), 5)}}" for k in KINDS)
    lines.append(f"{'all':<46} {len(rows):>6} {kinds[CLEAN]:>5} {cells}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=60, help="seconds per input (default 60)")
    parser.add_argument("--memory-gb", type=float, default=4, help="address space per input (default 4)")
    parser.add_argument("--memory-mb", type=float, default=500, help="peak memory over a plain match (default 500)")
    parser.add_argument("--jobs", type=int, default=1, help="inputs at a time (default 1)")
    parser.add_argument("--categories", help="comma-separated category numbers (default all)")
    parser.add_argument("-o", "--output", help="one JSON line per input")
    args = parser.parse_args()
    wanted = {int(c) for c in args.categories.split(",")} if args.categories else set(corpus.CATEGORIES)
    cases = [c for c in corpus.CASES if c.category in wanted]
    if 5 in wanted:
        cases.append(corpus.SECOND_WRITER)
    with tempfile.TemporaryDirectory(prefix="hostile-probe-") as scratch:
        root = Path(scratch)
        space = Workspace(root / "workspace")
        space.artifact(root / "warm-up")  # the originals are built here, once, before any input runs
        space.run(root / "warm-up-run")
        plain = root / "plain"
        plain.mkdir()
        plain_match = ["match", SPEC, "--rules", str(REPO / "rules/dual_utuner.yaml")]
        baseline_mb = max(run_cli(plain_match, plain, 300, 2**40)[1] for _ in range(2))  # a busy machine can miss one
        print(f"{len(cases)} inputs; a plain match peaks at {baseline_mb:.0f} MB; deadline {args.timeout:.0f} s")
        folders = [root / f"case-{i}" for i in range(len(cases))]
        argvs = [prepare(case, folder, space) for case, folder in zip(cases, folders)]
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [
                pool.submit(probe, case, folder, argv, args, baseline_mb)
                for case, folder, argv in zip(cases, folders, argvs)
            ]
            rows = []
            for future in futures:
                rows.append(future.result())
                row = rows[-1]
                print(f"  {row['kind']:<14} {row['seconds']:>5.1f} s {row['peak_mb']:>5} MB  {row['case']}", flush=True)
    print()
    print(table(rows))
    failing = [row for row in rows if row["kind"] != CLEAN]
    if failing:
        print("\nfailing inputs")
        for row in failing:
            print(f"[{row['category']}] {row['kind']}: {row['case']}\n    cli.py {row['argv']}\n    {row['output']}")
    if args.output:
        Path(args.output).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
