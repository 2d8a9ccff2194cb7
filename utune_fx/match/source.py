"""Rule files as located data: every value remembers its file, line and column.

    text --yaml.compose(SafeLoader)--> node tree --to_located--> Located(value, where)

Only YAML's safe tags are accepted (no Python objects, nothing executed); a
mapping's keys must be plain strings and appear once. What a file may cost
is bounded (:mod:`.limits`): bytes read, values after alias expansion,
nesting, integer digits, string and key lengths. Any problem, from invalid
YAML or a limit to a bad value found later by the validator, is a
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
from utune_fx.match import limits
from utune_fx.match.limits import Limit


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

    def name(self, what: str) -> str:
        """A name (of a rule, a pattern, a file) or a glob, within the name-length limit."""
        text = self.text()
        if len(text) > limits.RULE_NAME_LENGTH.value():
            raise self.over(f"{what} of {len(text):,} characters", limits.RULE_NAME_LENGTH)
        return text

    def over(self, what: str, limit: Limit, at_key: bool = False) -> RuleError:
        """The refusal of a limit: ``file:line:col: key: what; the limit is N; hint, or set ENV``."""
        message = f"{what}; {limit.advice()}"
        return self.fail_key(message) if at_key else self.fail(message)

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
_INT_TAG = "tag:yaml.org,2002:int"


def _where(mark: yaml.Mark, file: str) -> Where:
    return Where(file, mark.line + 1, mark.column + 1)


def _over(where: Where, key: str, what: str, limit: Limit) -> RuleError:
    """The refusal of a limit: ``file:line:col: key: what; the limit is N; hint, or set ENV``."""
    if len(key) > 100:  # a deep key, maybe of long names: its ends say where it is
        key = f"{key[:50]}...{key[-45:]}"
    return RuleError(f"{where}: {key or '(top level)'}: {what}; {limit.advice()}")


class _BoundedLoader(yaml.SafeLoader):
    """YAML's safe loader, whose composer counts values and nesting as it reads, so a
    huge or deep document stops early (the composer recurses once per level)."""

    def __init__(self, text: str, file: str):
        super().__init__(text)
        self.file = file
        self.path: list[str] = []  # the key of the node being composed, piece by piece
        self.values, self.max_values = 0, limits.RULE_VALUES.value()
        self.max_depth = limits.RULE_NESTING.value()

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        where = _where(self.peek_event().start_mark, self.file)
        piece = f".{index.value}" if isinstance(index, yaml.ScalarNode) else f"[{index}]" if index is not None else ""
        self.path.append(piece)
        key = "".join(self.path).lstrip(".")
        self.values += 1
        if self.values > self.max_values:
            raise _over(where, key, f"more than {self.max_values:,} values", limits.RULE_VALUES)
        if len(self.path) > self.max_depth:
            raise _over(where, key, f"nested more than {self.max_depth} levels deep", limits.RULE_NESTING)
        try:
            return super().compose_node(parent, index)
        finally:
            self.path.pop()


class _Converter:
    """Composed YAML nodes -> Located values, expanding aliases within a budget of values
    and nesting (a few aliases can stand for billions of values)."""

    def __init__(self, file: str):
        self.file = file
        self.constructor = yaml.SafeLoader("")
        self.values, self.max_values = 0, limits.RULE_VALUES.value()
        self.max_depth = limits.RULE_NESTING.value()
        self.max_string = limits.RULE_STRING_LENGTH.value()
        self.max_name = limits.RULE_NAME_LENGTH.value()
        self.max_digits = limits.RULE_INTEGER_DIGITS.value()
        self._wheres: dict[int, Where] = {}  # id(mark) -> Where: aliases revisit the same nodes

    def where(self, mark: yaml.Mark) -> Where:
        if id(mark) not in self._wheres:
            self._wheres[id(mark)] = _where(mark, self.file)
        return self._wheres[id(mark)]

    def convert(self, node: yaml.Node, key: str, open_nodes: frozenset[int] = frozenset()) -> Located:
        where = self.where(node.start_mark)
        if id(node) in open_nodes:
            raise RuleError(f"{where}: {key or '(top level)'}: an alias refers to its own parent; remove the cycle")
        self.values += 1
        if self.values > self.max_values:
            what = f"more than {self.max_values:,} values once aliases are expanded"
            raise _over(where, key, what, limits.RULE_VALUES)
        if len(open_nodes) >= self.max_depth:
            raise _over(where, key, f"nested more than {self.max_depth} levels deep", limits.RULE_NESTING)
        open_nodes = open_nodes | {id(node)}
        if not isinstance(node, yaml.ScalarNode) and node.tag not in _PLAIN_TAGS:
            raise RuleError(
                f"{where}: {key or '(top level)'}: tag {node.tag} is not allowed; rule files hold plain data only"
            )
        if isinstance(node, yaml.MappingNode):
            return Located(self._entries(node, key, open_nodes), where, key)
        if isinstance(node, yaml.SequenceNode):
            items = [self.convert(item, f"{key}[{i}]", open_nodes) for i, item in enumerate(node.value)]
            return Located(items, where, key)
        return Located(self._scalar(node, where, key), where, key)

    def _entries(self, node: yaml.MappingNode, key: str, open_nodes: frozenset[int]) -> dict[str, Located]:
        entries: dict[str, Located] = {}
        for key_node, value_node in node.value:
            key_where = self.where(key_node.start_mark)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                raise RuleError(f"{key_where}: {key or '(top level)'}: keys must be plain names")
            name = key_node.value
            if len(name) > self.max_name:
                what = f"a key of {len(name):,} characters"
                raise _over(key_where, key, what, limits.RULE_NAME_LENGTH)
            if name in entries:
                raise RuleError(f"{key_where}: {key + '.' if key else ''}{name}: key given twice; keep one")
            child = self.convert(value_node, f"{key}.{name}" if key else name, open_nodes)
            child._key_where = key_where  # type: ignore[attr-defined]
            entries[name] = child
        return entries

    def _scalar(self, node: yaml.ScalarNode, where: Where, key: str) -> Any:
        if len(node.value) > self.max_string:
            what = f"a value of {len(node.value):,} characters"
            raise _over(where, key, what, limits.RULE_STRING_LENGTH)
        digits = node.value.lstrip("+-").replace("_", "")
        if node.tag == _INT_TAG and len(digits) > self.max_digits:  # before int(), which caps digits itself
            raise _over(where, key, f"an integer of {len(digits):,} digits", limits.RULE_INTEGER_DIGITS)
        try:
            value = self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as error:
            raise RuleError(f"{where}: {key or '(top level)'}: {str(error).splitlines()[0]}") from error
        except (ValueError, OverflowError) as error:  # a date YAML recognises but the calendar has not: 2001-02-30
            raise RuleError(
                f"{where}: {key or '(top level)'}: cannot read {node.value!r} ({error}); quote it"
            ) from None
        if isinstance(value, str) and not _encodable(value):
            raise RuleError(
                f"{where}: {key or '(top level)'}: the text holds an unpaired surrogate (\\ud800); remove it"
            )
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**self.max_digits:
            raise _over(where, key, f"an integer of {len(str(value)):,} digits", limits.RULE_INTEGER_DIGITS)
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            raise RuleError(
                f"{where}: {key or '(top level)'}: unsupported value {_short(value)}; "
                "use strings, numbers, booleans, lists and mappings"
            )
        return value


def _encodable(text: str) -> bool:
    """Whether the text can be printed as UTF-8 (an escaped lone surrogate, "\\ud800", cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"


def _byte_where(data: bytes, offset: int, file: str) -> Where:
    """The line and column of a byte offset (counted in bytes: the text may not decode)."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    return Where(file, data.count(b"\n", 0, offset) + 1, offset - line_start + 1)


def read_rule_text(path: str | Path) -> str:
    """A rule file's text: at most the byte limit is read (/dev/zero reports a size of 0), UTF-8 only."""
    path = Path(path)
    limit = limits.RULE_FILE_BYTES.value()
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise RuleError(f"{path}: rule file not found; check the path") from None
    except (OSError, ValueError) as error:  # ValueError: a NUL in the path
        raise RuleError(f"{path!s:.200}: cannot read the rule file ({error}); check the path") from error
    if len(data) > limit:
        where = _byte_where(data, limit, str(path))
        raise _over(where, "", f"the file has more than {limit:,} bytes", limits.RULE_FILE_BYTES)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        where = _byte_where(data, error.start, str(path))
        raise RuleError(
            f"{where}: (top level): byte 0x{data[error.start]:02x} is not UTF-8 text; save the file as UTF-8"
        ) from None


def load_located(path: str | Path) -> Located:
    """Parse one YAML file into a :class:`Located` tree (safe tags only, bounded)."""
    return parse_located(read_rule_text(path), str(path))


def parse_located(text: str, file: str) -> Located:
    try:
        loader = _BoundedLoader(text, file)  # the reader checks characters here already
    except yaml.reader.ReaderError as error:
        raise _unreadable(text, file, error) from None
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = _where(mark, file) if mark else Where(file, 1, 1)
        raise RuleError(f"{where}: invalid YAML: {error.problem or error.context}") from error
    except yaml.reader.ReaderError as error:
        raise _unreadable(text, file, error) from None
    except yaml.YAMLError as error:
        raise RuleError(f"{file}:1:1: invalid YAML: {str(error).splitlines()[0]}") from error
    finally:
        loader.dispose()
    if node is None:
        raise RuleError(f"{file}:1:1: the rule file is empty; start with 'version: 1'")
    return _Converter(file).convert(node, "")


def _unreadable(text: str, file: str, error: yaml.reader.ReaderError) -> RuleError:
    """A character YAML refuses (a NUL, a control character), located."""
    before = text[: max(error.position, 0)]
    where = Where(file, before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1)
    character = f"#x{error.character:04x}" if isinstance(error.character, int) else repr(error.character)
    return RuleError(f"{where}: invalid YAML: character {character} is not allowed in a rule file; remove it")
