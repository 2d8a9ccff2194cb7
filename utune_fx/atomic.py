"""Write a directory so that readers see the old one or the new one, never a mix.

with replace_directory(path) as staging:   # a fresh folder beside ``path``
    write files into staging
# on success staging becomes ``path`` (the old one is removed); on error ``path`` is untouched

write_text(path, text)                      # files alike, through a temporary name beside them

On Linux a swap is one atomic exchange of staging and ``path`` (renameat2 RENAME_EXCHANGE):
``path`` holds the old result or the new one at every instant. Where the file system cannot
exchange, it takes two renames: ``path`` -> ``.<name>.old`` (beside it), then staging -> ``path``.
A process killed between them leaves no ``path``, only the old result under the fixed
name ``.<name>.old``; :func:`recover_directory` (called by every swap first, and by
readers of such paths) puts it back. Killed after the second rename, ``path`` holds the
new result and ``.<name>.old`` is a leftover that recovery removes. So at any kill point the
next command finds the old or the new result whole under ``path``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from utune_fx.errors import UtuneError, first_line


def _aside(directory: Path) -> Path:
    """Where the old result waits during a swap; a fixed name, so the next call finds it."""
    return directory.parent / f".{directory.name}.old"


def _staging_prefix(directory: Path) -> str:
    return f".{directory.name}.staging."


def recover_directory(directory: str | Path, stale_staging: bool = False) -> None:
    """Finish what a killed swap of ``directory`` left: the old result back under its name when
    the new one never arrived, the set-aside copy removed when it did. With ``stale_staging``
    (only for callers that hold the folder's lock, so no other writer is mid-swap) half-written
    staging folders go too."""
    directory = Path(directory)
    aside = _aside(directory)
    if aside.is_dir():
        if directory.exists():
            shutil.rmtree(aside, ignore_errors=True)  # the swap finished; this is the old copy
        else:
            try:
                os.replace(aside, directory)
            except OSError as error:
                raise UtuneError(
                    f"{directory} is missing and its previous content waits in {aside} (a swap was killed), "
                    f"which cannot be moved back ({first_line(error)}); rename it to {directory.name}"
                ) from error
    if stale_staging and directory.parent.is_dir():
        for leftover in directory.parent.glob(_staging_prefix(directory) + "*"):
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def replace_directory(directory: str | Path) -> Iterator[Path]:
    directory = Path(directory)
    parent = directory.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    directory = parent / directory.name
    recover_directory(directory)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(directory), dir=parent))
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        for file in staging.rglob("*"):
            os.chmod(file, (0o777 if file.is_dir() else 0o666) & ~umask)
        if directory.exists():
            aside = _aside(directory)
            if _exchange(staging, directory):  # one atomic step: ``directory`` is never missing
                _rename(staging, aside)  # staging now holds the old result
            else:
                _rename(directory, aside)
                _rename(staging, directory)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            _rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(Exception):
            recover_directory(directory)  # an error between the renames: the old result goes back now
        raise


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the system or
    the file system cannot, and the swap falls back to two renames that recover_directory completes."""
    rename_at = getattr(_libc(), "renameat2", None)
    if rename_at is None:
        return False
    at_cwd, rename_exchange = -100, 2
    if rename_at(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(error, os.strerror(error), str(second))


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _rename(source: Path, target: Path) -> None:
    """One step of a swap (a seam for tests that kill a swap between its two renames)."""
    os.replace(source, target)


def replace_file(path: str | Path) -> contextlib.AbstractContextManager[Path]:
    """``with replace_file(path) as temporary:`` write ``temporary``; it becomes ``path`` on success."""
    return _replace_file(Path(path))


@contextlib.contextmanager
def _replace_file(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write a whole text file so readers see the old content or the new, never a part."""
    with replace_file(path) as temporary:
        temporary.write_text(text)
