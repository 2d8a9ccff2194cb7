"""Which of a pattern's regions a rule keeps: scope globs, then occurrences.

    scope: "blocks.*"   layers: "6:" | [0, -1]   first: 3   last: 2   every: 2
        -> Selection(scope, layers, first, last, every).apply(regions)

docs/rules.md, "Selecting occurrences", is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import fx

from utune_fx.match.globs import ScopeGlob
from utune_fx.match.source import Located
from utune_fx.match.structure import Region

SELECT_KEYS = ("scope", "layers", "first", "last", "every")


@dataclass
class Selection:
    scope: list[str] = field(default_factory=list)
    layers: list[int | slice] = field(default_factory=list)
    first: int | None = None
    last: int | None = None
    every: int | None = None

    def apply(self, regions: list[Region]) -> list[Region]:
        """Scope filter, then occurrence selection over what is left, numbered
        from 0 in graph order (the numbers ``cli.py match`` shows)."""
        if self.scope:
            globs = [ScopeGlob(g) for g in self.scope]
            regions = [r for r in regions if any(g.fullmatch(r.scope) for g in globs)]
        regions = [replace(r, index=i) for i, r in enumerate(regions)]
        if self.layers:
            chosen: set[fx.Node] = set()
            for item in self.layers:
                picked = (
                    regions[item]
                    if isinstance(item, slice)
                    else [regions[item]]
                    if -len(regions) <= item < len(regions)
                    else []
                )
                chosen.update(r.anchor for r in picked)
            regions = [r for r in regions if r.anchor in chosen]
        if self.first is not None:
            regions = regions[: self.first]
        if self.last is not None:
            regions = regions[-self.last :] if self.last else []
        if self.every is not None:
            regions = regions[:: self.every]
        return regions

    @property
    def empty(self) -> bool:
        return not (self.scope or self.layers) and self.first is None and self.last is None and self.every is None


def _int(value: Located, what: str, minimum: int) -> int:
    if not isinstance(value.value, int) or isinstance(value.value, bool) or value.value < minimum:
        raise value.fail(f"{what} must be an integer >= {minimum}, got {value.value!r}")
    return value.value


def _layers(value: Located) -> list[int | slice]:
    items = value.items() if isinstance(value.value, list) else [value]
    layers: list[int | slice] = []
    for item in items:
        if isinstance(item.value, int) and not isinstance(item.value, bool):
            layers.append(item.value)
            continue
        text = str(item.value).strip() if isinstance(item.value, str) else ""
        parts = text.split(":")
        try:
            numbers = [int(p) if p.strip() else None for p in parts]
        except ValueError:
            numbers = []
        if not numbers or len(numbers) > 3 or (len(numbers) == 1 and numbers[0] is None):
            raise item.fail(
                f"bad layers {item.value!r}; use an index (0, -1), a range 'start:stop[:step]' "
                "('0:6', '6:', '::2') or a list of them"
            )
        if len(numbers) == 3 and numbers[2] == 0:
            raise item.fail("a layers step cannot be 0")
        layers.append(numbers[0] if len(numbers) == 1 else slice(*numbers))
    return layers


def selection(entries: dict[str, Located]) -> Selection:
    selection = Selection()
    if "scope" in entries:
        value = entries["scope"]
        items = value.items() if isinstance(value.value, list) else [value]
        selection.scope = [item.name("a scope glob") for item in items]
    if "layers" in entries:
        selection.layers = _layers(entries["layers"])
    if "first" in entries:
        selection.first = _int(entries["first"], "first", 0)
    if "last" in entries:
        selection.last = _int(entries["last"], "last", 0)
    if "every" in entries:
        selection.every = _int(entries["every"], "every", 1)
    return selection
