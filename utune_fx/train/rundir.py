"""A training run directory: one writer at a time, settings that --resume holds to, results that agree.

    with open_run(out, resume, settings) as notices:   # lock OUT/.lock (one writer), recover killed swaps,
        ...train...                                    # check fresh/resume, compare settings with the checkpoint
    check_run_result(out)                              # readers: tuned/, checkpoint/, summary.json agree

The lock is ``fcntl.flock`` on OUT/.lock, held while the run lasts; the kernel drops it
when the process dies, so a run killed with -9 never blocks the next one. Settings are
what the run was started with (model, rules, data selection, every TrainConfig field);
``--resume`` refuses a change that alters the run and applies, saying so, the few that
are sound to change (more epochs, where it runs, how fast).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from utune_fx.atomic import recover_directory
from utune_fx.errors import UtuneError, first_line
from utune_fx.schemas import read_json
from utune_fx.train.checkpoint import read_state

CHECKPOINT, TUNED, SUMMARY, METRICS, LOCK = "checkpoint", "tuned", "summary.json", "metrics.jsonl", ".lock"
TUNED_TENSORS = "tuners.safetensors"
# settings a resumed run may take from the command line: they change where and how fast it runs,
# or (epochs) how long; every other setting changes what the run computes and must stay (the number of
# torchrun processes is no setting: --batch-size is the global batch, so any number computes the same)
SOUND_TO_CHANGE = ("epochs", "device", "precision", "compile", "workers", "fsdp", "cache_features")
_HELD: dict[Path, int] = {}  # run directories this process holds the lock of (open_run nests: CLI, then train())


@contextlib.contextmanager
def hold_lock(out: Path) -> Iterator[None]:
    """OUT/.lock held with flock for the block; a second writer is refused at once, in one line."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    if key in _HELD:
        yield
        return
    path = out / LOCK
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise UtuneError(f"{path}: cannot open the run's lock file ({first_line(error)})") from error
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(descriptor)
        os.close(descriptor)
        raise UtuneError(
            f"{out} is in use by another training run (process {holder} holds {path}); "
            "wait for it to end, or write to another -o"
        ) from None
    except OSError as error:  # a file system without locks (some network mounts)
        os.close(descriptor)
        raise UtuneError(f"{path}: cannot lock the run directory ({first_line(error)}); write to a local -o") from error
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, str(os.getpid()).encode(), 0)  # for the message a second writer sees
        _HELD[key] = descriptor
        yield
    finally:
        _HELD.pop(key, None)
        os.close(descriptor)  # closing drops the flock


@contextlib.contextmanager
def _reading(out: Path) -> Iterator[None]:
    """A shared flock on OUT/.lock while a reader checks and repairs the run: never while a run writes it
    (a repair then could undo a swap in flight). A folder no run has locked, or a read-only one, is read as is."""
    out, descriptor = Path(out), None
    with contextlib.suppress(OSError):
        descriptor = os.open(out / LOCK, os.O_RDONLY)
    try:
        if descriptor is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UtuneError(
                    f"{out} is being written by a training run (process {_holder(descriptor)} holds {out / LOCK}); "
                    "read it when the run has ended"
                ) from None
            except OSError:
                pass  # a file system without locks: read as is
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)


def _holder(descriptor: int) -> str:
    """The process id the lock's holder wrote into the lock file (for messages)."""
    return os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"


@contextlib.contextmanager
def open_run(out: Path, resume: bool, settings: dict) -> Iterator[list[str]]:
    """Lock ``out``, repair what a kill left, check it fits ``resume`` and ``settings``; yields notices
    (settings changed on --resume that are applied) for the caller to show."""
    out = Path(out)
    with hold_lock(out):
        for name in (CHECKPOINT, TUNED):
            recover_directory(out / name, stale_staging=True)  # we hold the lock: no other writer is mid-swap
        yield check_run_directory(out, resume, settings)


def check_run_directory(out: Path, resume: bool, settings: dict | None = None) -> list[str]:
    """Before any work: --resume needs a checkpoint whose settings fit, and a fresh run must not mix with an
    old one. Returns the notices of sound changes."""
    has_checkpoint = (out / CHECKPOINT).is_dir()
    if resume and not has_checkpoint:
        raise UtuneError(f"{out}/checkpoint does not exist; run without --resume to start")
    if not resume and (has_checkpoint or (out / METRICS).exists()):
        raise UtuneError(f"{out} holds an earlier run; pass --resume to continue it, or choose another -o")
    if not resume or settings is None:
        return []
    state = read_state(out / CHECKPOINT)
    return compare_settings(out, state["settings"], settings, state["progress"]["epoch"])


def config_settings(config) -> dict:
    """A TrainConfig as recorded settings."""
    return dataclasses.asdict(config)


def file_sha256(path: str | Path) -> str | None:
    """sha256 of a regular file's bytes, read in chunks (rule files: their content is what matters, not the
    path); None if unreadable or not a regular file (/dev/zero, a pipe: whoever reads it refuses it)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return None
            while chunk := handle.read(2**20):
                digest.update(chunk)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return None
    return digest.hexdigest()


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _flag(name: str) -> str:
    return "MODEL" if name == "model" else "--" + name.replace("_", "-")  # the model is train's first argument


def compare_settings(out: Path, old: dict, new: dict, epochs_done: int) -> list[str]:
    """Refuse, in one line naming each, settings that would change the run; notices for the sound ones."""
    changed, notices = [], []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if name == "rules" or before == after:  # rule files compare by content (rules_sha256), not by path
            continue
        if name not in old and after in (False, None):  # a switch newer than the run (--fsdp), left off
            continue
        if name == "rules_sha256":
            changed.append(f"--rules {_shown(old.get('rules'))} (now {_shown(new.get('rules'))}, other content)")
        elif name not in SOUND_TO_CHANGE:
            changed.append(f"{_flag(name)} {_shown(before)} (now {_shown(after)})")
        elif name == "epochs" and isinstance(after, int) and after < epochs_done:
            raise UtuneError(
                f"{out} has trained {epochs_done} epochs already; pass --epochs {epochs_done} or more to resume it"
            )
        elif name == "epochs":
            notices.append(f"--epochs {before} -> {after} (the cosine decay now ends at epoch {after})")
        else:
            notices.append(f"{_flag(name)} {_shown(before)} -> {_shown(after)}")
    if changed:
        raise UtuneError(
            f"{out} was trained with other settings: {', '.join(changed)}; resume with the run's values, "
            "or start a new run in another -o"
        )
    return notices


def check_run_result(out: Path) -> None:
    """For readers of a run directory: tuned/, checkpoint/ and summary.json are at the same epoch, or one
    line says the run stopped before it finished and how to finish it."""
    out = Path(out)
    if out.resolve() in _HELD:
        return  # this process trains into the run it reads (train RUN -o RUN --resume): it rewrites tuned/
    with _reading(out):
        _check_run_result(out)


def _check_run_result(out: Path) -> None:
    for name in (CHECKPOINT, TUNED):
        recover_directory(out / name)
    if not (out / CHECKPOINT).is_dir():
        return
    progress = read_state(out / CHECKPOINT)["progress"]
    at = f"epoch {progress['epoch']}" + (f" step {progress['step']}" if progress["step"] else "")
    summary = read_json(out / SUMMARY, "summary") if (out / SUMMARY).is_file() else None
    tuned = file_sha256(out / TUNED / TUNED_TENSORS)
    if summary is None or tuned is None:
        problem = f"the checkpoint is at {at} but {SUMMARY if summary is None else 'tuned/'} was not written"
    elif summary["epochs"] != progress["epoch"] or progress["step"]:
        problem = f"the checkpoint is at {at} but {SUMMARY} at epoch {summary['epochs']}"
    elif summary.get("tuned_sha256") != tuned:
        problem = f"tuned/ is not the result {SUMMARY} describes (epoch {summary['epochs']})"
    else:
        return
    raise UtuneError(
        f"{out}: {problem}: the run stopped before it finished; finish it with cli.py train ... -o {out} --resume "
        f"(same settings), or name {out / TUNED} to read tuned/ as it is"
    )
