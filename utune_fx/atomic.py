"""Write a directory so that readers see the old one or the new one, never a mix.

with replace_directory(path) as staging:   # a fresh folder beside ``path``
    write files into staging
# on success staging becomes ``path`` (the old one is removed); on error ``path`` is untouched

write_text(path, text)                      # files alike, through a temporary name beside them
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replace_directory(directory: str | Path) -> Iterator[Path]:
    directory = Path(directory)
    parent = directory.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=parent))
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        for file in staging.rglob("*"):
            os.chmod(file, (0o777 if file.is_dir() else 0o666) & ~umask)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=parent))
            os.replace(directory, old / directory.name)
            os.replace(staging, directory)
            shutil.rmtree(old)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
