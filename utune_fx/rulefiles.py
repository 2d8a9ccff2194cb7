"""Shipped rule files, found by name from any directory.

    --rules lora              -> the shipped lora.yaml (also --rules lora.yaml)
    --rules my/rules.yaml     -> that file; a path that exists always wins over a shipped name
    --rules lorra             -> one line: not found, the shipped names, the closest one

The files live in the repository's top-level ``rules/`` folder, where authors copy and edit
them. A wheel carries the same folder as ``utune_fx/rules`` (pyproject.toml maps it into the
package), so an installed utune_fx finds them without a checkout; a source checkout and an
editable install find them at the top of the repository.
"""

from __future__ import annotations

import difflib
from pathlib import Path

SUFFIX = ".yaml"
_PACKAGE = Path(__file__).resolve().parent


def shipped_rules_folder() -> Path | None:
    """Where the shipped rule files are: inside the installed package, else the checkout's rules/."""
    for folder in (_PACKAGE / "rules", _PACKAGE.parent / "rules"):
        if folder.is_dir():
            return folder
    return None


def shipped_rule_names() -> list[str]:
    """The names ``--rules`` accepts for shipped rule files (file names without .yaml), sorted."""
    folder = shipped_rules_folder()
    return sorted(file.stem for file in folder.glob(f"*{SUFFIX}")) if folder else []


def rule_file_path(path: str | Path) -> Path:
    """The rule file ``path`` names: the path itself when it exists, else the shipped rule file
    of that name (``lora`` or ``lora.yaml``). Anything else is a :class:`RuleError` that lists
    the shipped names, so the message is the same from every directory."""
    given = Path(path)
    if given.exists():
        return given
    names = shipped_rule_names()
    bare = given.name == str(path) and given.suffix in ("", SUFFIX)  # no folder part: may be a name
    if bare and given.stem in names:
        return shipped_rules_folder() / f"{given.stem}{SUFFIX}"
    from utune_fx.match.source import RuleError  # here: this module stays light for the CLI's --help

    close = difflib.get_close_matches(given.stem, names, n=1)
    hint = f"; did you mean --rules {close[0]}?" if close else ""
    raise RuleError(
        f"{path}: rule file not found; pass the path of a rule file or the name of a shipped one "
        f"({', '.join(names) or 'none installed'}){hint}"
    )
