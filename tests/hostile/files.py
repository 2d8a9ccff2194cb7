"""Hostile rule-file text: valid YAML shapes with values an attacker would pick.

Shared by the corpus (tests/test_hostile_corpus.py, benchmarks/hostile_probe.py) and the
fuzzer (tests/test_fuzz.py). Everything is generated, so the corpus holds no large files:

    laughs(9, 9)                  "billion laughs": 9 levels of 9 aliases, 9**9 leaves once expanded
    deep("not", 3000)             a node predicate nested 3,000 levels
    stars(25)                     '*' * 25 + 'b': a glob that backtracks exponentially if translated naively
    rule_file(rule(...), ...)     a rule file around rules written as flow mappings
"""

from __future__ import annotations

import itertools

_anchor_names = itertools.count()


def laughs(levels: int = 9, width: int = 9, mapping: bool = False, leaf: str = "lol") -> str:
    """A flow value whose last entry expands to width**levels leaves; the anchors are local to
    it, so it can stand anywhere a value can. ``mapping``: mappings only, no lists."""
    tag = f"l{next(_anchor_names)}_"
    if mapping:
        entries = [f"&{tag}0 {{{', '.join(f'k{i}: {leaf}' for i in range(width))}}}"]
        for level in range(1, levels):
            entries.append(f"&{tag}{level} {{{', '.join(f'k{i}: *{tag}{level - 1}' for i in range(width))}}}")
        return "{" + ", ".join(f"a{i}: {entry}" for i, entry in enumerate(entries)) + "}"
    entries = [f"&{tag}0 [{', '.join([leaf] * width)}]"]
    for level in range(1, levels):
        entries.append(f"&{tag}{level} [{', '.join([f'*{tag}{level - 1}'] * width)}]")
    return "[" + ", ".join(entries) + "]"


def deep(form: str, depth: int, core: str = "{kind: linear}") -> str:
    """A node predicate nested ``depth`` levels through ``not`` or ``any_of`` (flow YAML)."""
    if form == "not":
        return "{not: " * depth + core + "}" * depth
    if form == "any_of":
        return "{any_of: [" * depth + core + "]}" * depth
    if form == "list":
        return "[" * depth + core + "]" * depth
    raise ValueError(form)


def deep_pattern(depth: int) -> str:
    """A pattern (not a predicate) nested ``depth`` levels of ``any_of`` and ``pattern``."""
    return "{any_of: [{pattern: " * depth + "attention" + "}]}" * depth


def stars(count: int, tail: str = "b") -> str:
    """A glob of ``count`` stars then a letter no module path ends with."""
    return "'" + "*" * count + tail + "'"


def rule(
    name: str = "r",
    match: str = "attention",
    tuner: str = "parallel_adapter",
    settings: str | None = "{hidden: 4}",
    extra: str = "",
) -> str:
    """One rule as a flow mapping (a line of a block list)."""
    parts = [f"name: {name}", f"match: {match}", f"tuner: {tuner}"]
    if settings is not None:
        parts.append(f"settings: {settings}")
    if extra:
        parts.append(extra)
    return "  - {" + ", ".join(parts) + "}\n"


def rule_file(*rules: str, head: str = "") -> str:
    """A rule file: version, optional top-level lines, the rules."""
    return "version: 1\n" + head + "rules:\n" + "".join(rules or (rule(),))


def many_rules(count: int) -> str:
    """A rule file of ``count`` distinct small rules (120,000 make about 10 MB)."""
    return rule_file(*(rule(f"rule_{i}", "linear", "lora", "{rank: 2}") for i in range(count)))


def graph_of(nodes: int) -> str:
    """A graph pattern of ``nodes`` unconstrained nodes chained by ``->*``: every ordering is a candidate."""
    names = [f"n{i}" for i in range(nodes)]
    body = ", ".join(f"{name}: {{}}" for name in names)
    edges = ", ".join(f'"{a} ->* {b}"' for a, b in zip(names, names[1:]))
    return "{graph: {nodes: {" + body + "}, edges: [" + edges + "]}}"
