"""Rule files as located data: every value remembers its file, line and column.

    text --yaml.compose(SafeLoader)--> node tree --to_located--> Located(value, where)

Only YAML's safe tags are accepted (no Python objects, nothing executed); a
mapping's keys must be plain strings and appear once. Any problem, from
invalid YAML to a bad value found later by the validator, is a
:class:`RuleError` whose message starts with ``file:line:col:``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from utune_fx.errors import UtuneError


class RuleError(UtuneError):
    """A problem in a rule file, located: ``file:line:col: key: what; fix``."""


@dataclass(frozen=True)
class Where:
    file: str
    line: int  # 1-based
    column: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass
class Located:
    """A YAML value with its position; mappings and lists hold Located values."""

    value: Any
    where: Where
    key: str = ""  # dotted path from the document root, for messages

    def fail(self, message: str) -> RuleError:
        return RuleError(f"{self.where}: {self.key or '(top level)'}: {message}")

    # -- typed access ------------------------------------------------------------
    def mapping(self) -> dict[str, Located]:
        if not isinstance(self.value, dict):
            raise self.fail(f"expected a mapping (key: value lines), got {_describe(self.value)}")
        return self.value

    def items(self) -> list[Located]:
        if not isinstance(self.value, list):
            raise self.fail(f"expected a list, got {_describe(self.value)}")
        return self.value

    def text(self) -> str:
        if not isinstance(self.value, str) or not self.value:
            raise self.fail(f"expected a non-empty string, got {_describe(self.value)}")
        return self.value

    def plain(self) -> Any:
        """The value with positions stripped (for settings handed to dataclasses)."""
        if isinstance(self.value, dict):
            return {k: v.plain() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.plain() for v in self.value]
        return self.value

    def check_keys(self, allowed: Iterable[str], required: Iterable[str] = ()) -> dict[str, Located]:
        entries = self.mapping()
        allowed = list(allowed)
        for key, value in entries.items():
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(allowed)}"
                raise value.fail_key(f"unknown key '{key}'; {hint}")
        for key in required:
            if key not in entries:
                raise self.fail(f"missing key '{key}'")
        return entries

    def fail_key(self, message: str) -> RuleError:
        """An error located at this value's key rather than at the value."""
        return RuleError(f"{self.key_where}: {self.key}: {message}")

    @property
    def key_where(self) -> Where:
        return getattr(self, "_key_where", self.where)


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing"


_PLAIN_TAGS = frozenset({"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"})


def _where(mark: yaml.Mark, file: str) -> Where:
    return Where(file, mark.line + 1, mark.column + 1)


def _to_located(
    node: yaml.Node, loader: yaml.SafeLoader, file: str, key: str, open_nodes: frozenset[int] = frozenset()
) -> Located:
    where = _where(node.start_mark, file)
    if id(node) in open_nodes:
        raise RuleError(f"{where}: {key or '(top level)'}: an alias refers to its own parent; remove the cycle")
    open_nodes = open_nodes | {id(node)}
    if not isinstance(node, yaml.ScalarNode) and node.tag not in _PLAIN_TAGS:
        raise RuleError(
            f"{where}: {key or '(top level)'}: tag {node.tag} is not allowed; rule files hold plain data only"
        )
    if isinstance(node, yaml.MappingNode):
        entries: dict[str, Located] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                raise RuleError(
                    f"{_where(key_node.start_mark, file)}: {key or '(top level)'}: keys must be plain names"
                )
            name = key_node.value
            if name in entries:
                raise RuleError(
                    f"{_where(key_node.start_mark, file)}: {key + '.' if key else ''}{name}: key given twice; keep one"
                )
            child = _to_located(value_node, loader, file, f"{key}.{name}" if key else name, open_nodes)
            child._key_where = _where(key_node.start_mark, file)  # type: ignore[attr-defined]
            entries[name] = child
        return Located(entries, where, key)
    if isinstance(node, yaml.SequenceNode):
        return Located(
            [_to_located(item, loader, file, f"{key}[{i}]", open_nodes) for i, item in enumerate(node.value)],
            where,
            key,
        )
    try:
        value = loader.construct_object(node, deep=True)
    except yaml.YAMLError as error:
        raise RuleError(f"{where}: {key or '(top level)'}: {str(error).splitlines()[0]}") from error
    if not isinstance(value, (str, int, float, bool)) and value is not None:
        raise RuleError(
            f"{where}: {key or '(top level)'}: unsupported value {value!r}; "
            "use strings, numbers, booleans, lists and mappings"
        )
    return Located(value, where, key)


def load_located(path: str | Path) -> Located:
    """Parse one YAML file into a :class:`Located` tree (safe tags only)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuleError(f"{path}: rule file not found; check the path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RuleError(f"{path}: cannot read the rule file ({error})") from error
    return parse_located(text, str(path))


def parse_located(text: str, file: str) -> Located:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = _where(mark, file) if mark else Where(file, 1, 1)
        raise RuleError(f"{where}: invalid YAML: {error.problem or error.context}") from error
    except yaml.YAMLError as error:
        raise RuleError(f"{file}:1:1: invalid YAML: {str(error).splitlines()[0]}") from error
    finally:
        loader.dispose()
    if node is None:
        raise RuleError(f"{file}:1:1: the rule file is empty; start with 'version: 1'")
    return _to_located(node, yaml.SafeLoader(""), file, "")
