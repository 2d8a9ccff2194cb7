"""Run many models through the chain: own subprocesses, bounded, two at a time, resumable.

    sweep(["vit_tiny_patch16_224", ...], results="zoo.jsonl", jobs=2, timeout=600, memory_gb=10)
        -> one JSON line per model appended to zoo.jsonl as it finishes; models already in the
           file are skipped, so an interrupted sweep continues where it stopped

Each model runs ``python -m utune_fx.zoo.stages NAME CATALOG RULE_FILES`` (offline: nothing is downloaded) with a wall-clock timeout and an
address-space limit (so one model cannot take the machine); a worker that dies, runs out of
memory or time is recorded as such, with the stage it had reached unknown (``build``).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from utune_fx.train.progress import count_progress
from utune_fx.zoo.stages import RULE_FILES


def done_models(results: Path) -> dict[str, dict]:
    """Records already in the results file (a torn last line from a kill is ignored)."""
    records = {}
    if results.is_file():
        for line in results.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[record["model"]] = record
    return records


def _limits(memory_gb: float) -> Callable[[], None]:
    def apply() -> None:
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def _failed(name: str, kind: str, message: str) -> dict:
    return {
        "model": name,
        "stages": {},
        "last_stage": None,
        "found": {},
        "error": {"stage": "build", "class": kind, "message": message[:300]},
    }


def run_one(
    name: str, timeout: float, memory_gb: float, catalog: str = "timm", rule_files: tuple[str, ...] = RULE_FILES
) -> dict:
    start = time.perf_counter()
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "utune_fx.zoo.stages", name, catalog, ",".join(rule_files)],
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=_limits(memory_gb),
            env=environment,
        )
    except subprocess.TimeoutExpired:
        return _failed(name, "Timeout", f"did not finish within {timeout:.0f} s") | {"seconds": timeout}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        kind = "MemoryError" if "MemoryError" in done.stderr or done.returncode in (-9, 137) else "WorkerDied"
        record = _failed(name, kind, f"exit {done.returncode}: {tail}")
    else:
        record = json.loads(lines[-1])
    return record | {"seconds": round(time.perf_counter() - start, 1)}


def sweep(
    names: list[str],
    results: Path,
    jobs: int = 2,
    timeout: float = 600,
    memory_gb: float = 10,
    progress: bool = True,
    catalog: str = "timm",
    rule_files: tuple[str, ...] = RULE_FILES,
) -> dict[str, dict]:
    """Run what is not yet in ``results``; returns every record (old and new) by model."""
    results.parent.mkdir(parents=True, exist_ok=True)
    records = done_models(results)
    todo = [name for name in names if name not in records]
    with (
        count_progress("last", progress) as bar,
        ThreadPoolExecutor(max_workers=jobs) as pool,
        results.open("a") as sink,
    ):
        if results.stat().st_size and not results.read_bytes().endswith(b"\n"):
            sink.write("\n")  # end a line a killed sweep tore, so the next record stands alone
        task = bar.add_task("zoo", total=len(todo), last="")
        futures = {pool.submit(run_one, name, timeout, memory_gb, catalog, rule_files): name for name in todo}
        for future in as_completed(futures):
            record = future.result()
            records[record["model"]] = record
            sink.write(json.dumps(record) + "\n")
            sink.flush()  # a kill loses at most the models still running
            bar.update(task, advance=1, last=f"{record['model']}: {record['last_stage'] or 'failed'}")
    return {name: records[name] for name in names if name in records}
