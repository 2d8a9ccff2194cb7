"""Rule files: which operations get which tuner, where.

    rule file --load_rules--> RuleSet(patterns, rules)    validated, located errors
    RuleSet + traced graph --match_rules--> [RuleMatch(rule, regions, dropped)]

A rule's regions: its pattern's regions, filtered by ``scope``, then
occurrence selection (``layers`` / ``first`` / ``last`` / ``every``), minus
``exclude``, then the overlap policy: regions of one rule never overlap; of
two that share a node (other than the input they read, or one no graph
input reaches: a shared position MLP) the earlier in graph
order stays, and the later is reported as dropped. Regions of different
rules may overlap; the rewriter refuses a tuner on another tuner's nodes.
A rule with ``fallback_for: [names]`` applies only where those (earlier)
rules matched nothing: LoRA on every layer of a network that has neither
attention nor residual blocks.
docs/rules.md is the reference.
"""

from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import fx

from utune_fx.match.patterns import MatchContext, Pattern, compile_pattern
from utune_fx.match.predicates import scope_regex
from utune_fx.match.source import Located, load_located
from utune_fx.match.structure import Region
from utune_fx.tuners import TUNERS, TunerConfig, create_config

PRELUDE = Path(__file__).with_name("prelude.yaml")
VERSION = 1
TOP_KEYS = ("version", "description", "imports", "patterns", "rules")
RULE_KEYS = (
    "name",
    "description",
    "match",
    "tuner",
    "settings",
    "position",
    "scope",
    "layers",
    "first",
    "last",
    "every",
    "exclude",
    "train",
    "fallback_for",
)
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
            regexes = [scope_regex(g) for g in self.scope]
            regions = [r for r in regions if any(x.fullmatch(r.scope) for x in regexes)]
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


@dataclass
class Rule:
    name: str
    pattern: Pattern
    tuner: str
    config: TunerConfig
    position: str
    select: Selection
    exclude: Selection | None
    train: list[str]
    where: str
    fallback_for: list[str] = field(default_factory=list)  # applies only where these rules matched nothing


@dataclass
class RuleSet:
    path: str
    patterns: dict[str, Pattern]
    rules: list[Rule]
    sources: dict[str, str] = field(default_factory=dict)  # file (relative to the rule file's folder) -> text


@dataclass
class RuleMatch:
    rule: Rule
    regions: list[Region]
    candidates: int  # the pattern's regions before selection
    dropped: list[tuple[Region, str]]  # overlaps removed, with the reason
    standby: str | None = None  # why a fallback rule did not apply


# -- loading ---------------------------------------------------------------------------


class _Loader:
    def __init__(self) -> None:
        self.raw: dict[str, Located] = {}  # pattern name -> definition
        self.compiled: dict[str, Pattern] = {}
        self.compiling: list[str] = []
        self.loaded: set[Path] = set()
        self.texts: dict[Path, str] = {}

    def load_file(self, path: Path) -> Located:
        root = load_located(path)  # messages name the path as given
        entries = root.check_keys(TOP_KEYS)
        if "version" not in entries and path.resolve() != PRELUDE.resolve():
            raise root.fail(f"missing key 'version'; start the file with 'version: {VERSION}'")
        if "version" in entries and entries["version"].value != VERSION:
            raise entries["version"].fail(
                f"unsupported version {entries['version'].value!r}; this utune_fx reads version {VERSION}"
            )
        self.loaded.add(path.resolve())
        self.texts[path] = path.read_text(encoding="utf-8")
        for item in entries["imports"].items() if "imports" in entries else []:
            target = path.parent / item.text()
            if target.resolve() in self.loaded:
                continue
            if not target.is_file():
                raise item.fail(f"imported file {item.value!r} not found next to {path.name}")
            self.load_file(target)
        for name, definition in entries["patterns"].mapping().items() if "patterns" in entries else []:
            if not name.isidentifier():
                raise definition.fail_key(f"pattern names are identifiers (letters, digits, _), not {name!r}")
            if name in self.raw:
                raise definition.fail_key(
                    f"pattern '{name}' is already defined at {self.raw[name].where}; pick another name"
                )
            self.raw[name] = definition
        return root

    def resolve(self, value: Located) -> Pattern:
        if isinstance(value.value, str):
            name = value.value
            if name not in self.raw:
                close = difflib.get_close_matches(name, list(self.raw), n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise value.fail(f"unknown pattern '{name}'; {hint}known: {', '.join(sorted(self.raw))}")
            return self.pattern(name)
        return compile_pattern(value, value.key, self.resolve)

    def pattern(self, name: str) -> Pattern:
        if name not in self.compiled:
            if name in self.compiling:
                cycle = " -> ".join(self.compiling[self.compiling.index(name) :] + [name])
                raise self.raw[name].fail(f"patterns refer to each other in a cycle: {cycle}")
            self.compiling.append(name)
            self.compiled[name] = compile_pattern(self.raw[name], name, self.resolve)
            self.compiling.pop()
        return self.compiled[name]


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


def _selection(entries: dict[str, Located]) -> Selection:
    selection = Selection()
    if "scope" in entries:
        value = entries["scope"]
        selection.scope = [i.text() for i in value.items()] if isinstance(value.value, list) else [value.text()]
    if "layers" in entries:
        selection.layers = _layers(entries["layers"])
    if "first" in entries:
        selection.first = _int(entries["first"], "first", 0)
    if "last" in entries:
        selection.last = _int(entries["last"], "last", 0)
    if "every" in entries:
        selection.every = _int(entries["every"], "every", 1)
    return selection


def _config(entries: dict[str, Located], tuner: str) -> TunerConfig:
    settings = entries.get("settings")
    values = settings.mapping() if settings is not None else {}
    fields = TUNERS[tuner].fields()
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"{tuner} takes: {', '.join(fields) or 'no settings'}"
            raise value.fail_key(f"unknown setting '{key}' for tuner {tuner}; {hint}")
    try:
        return create_config(tuner, {k: v.plain() for k, v in values.items()})
    except (TypeError, ValueError) as error:
        bad = next((values[k] for k in values if str(error).startswith(k)), settings)
        help_text = next((f" ({fields[k]})" for k in values if str(error).startswith(k) and fields[k]), "")
        raise (bad or entries["tuner"]).fail(f"{error}{help_text}") from error


def _rule(value: Located, loader: _Loader, names: set[str]) -> Rule:
    entries = value.check_keys(RULE_KEYS, required=("name", "match", "tuner"))
    name = entries["name"].text()
    if name in names:
        raise entries["name"].fail(f"rule name '{name}' is used twice; names must be unique")
    tuner = entries["tuner"].text()
    if tuner not in TUNERS:
        close = difflib.get_close_matches(tuner, list(TUNERS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise entries["tuner"].fail(f"unknown tuner '{tuner}'; {hint}valid: {', '.join(TUNERS)}")
    positions = TUNERS[tuner].positions
    position = entries["position"].text() if "position" in entries else positions[0]
    if position not in positions:
        raise entries["position"].fail(f"tuner {tuner} works at position {' or '.join(positions)}, not '{position}'")
    exclude = None
    if "exclude" in entries:
        exclude = _selection(entries["exclude"].check_keys(SELECT_KEYS))
        if exclude.empty:
            raise entries["exclude"].fail(f"exclude needs one of {', '.join(SELECT_KEYS)}")
    train = []
    if "train" in entries:
        items = entries["train"].items() if isinstance(entries["train"].value, list) else [entries["train"]]
        train = [item.text() for item in items]
    fallback_for = []
    if "fallback_for" in entries:
        listed = entries["fallback_for"]
        for item in listed.items() if isinstance(listed.value, list) else [listed]:
            if item.text() not in names:
                raise item.fail(
                    f"fallback_for names rule '{item.text()}', which is not defined above this rule; "
                    f"rules above: {', '.join(sorted(names)) or 'none'}"
                )
            fallback_for.append(item.text())
    return Rule(
        name,
        loader.resolve(entries["match"]),
        tuner,
        _config(entries, tuner),
        position,
        _selection(entries),
        exclude,
        train,
        str(value.where),
        fallback_for,
    )


def load_rules(path: str | Path) -> RuleSet:
    """Load and check a rule file (and what it imports, and the prelude). ``path`` may also name
    a shipped rule file (``lora``); the RuleSet then records that file's full path."""
    from utune_fx.rulefiles import rule_file_path

    path = rule_file_path(path)  # `lora` -> the shipped lora.yaml; a path that exists wins
    loader = _Loader()
    loader.load_file(PRELUDE)
    loader.compiled.update(load_prelude())  # shared, so contexts cache the prelude's regions once
    root = loader.load_file(Path(path))
    entries = root.mapping()
    if "rules" not in entries:
        raise root.fail("missing key 'rules'; a rule file lists at least one rule")
    names: set[str] = set()
    rules = []
    for item in entries["rules"].items():
        rules.append(_rule(item, loader, names))
        names.add(rules[-1].name)
    if not rules:
        raise entries["rules"].fail("the rules list is empty; add a rule")
    patterns = {name: loader.pattern(name) for name in loader.raw}  # compile all: errors surface at load
    folder = Path(path).parent
    sources = {
        os.path.relpath(file, folder): text
        for file, text in loader.texts.items()
        if file.resolve() != PRELUDE.resolve()
    }
    return RuleSet(str(path), patterns, rules, sources)


@functools.cache
def load_prelude() -> dict[str, Pattern]:
    """The shipped patterns, parsed once per process (patterns hold no graph state)."""
    loader = _Loader()
    loader.load_file(PRELUDE)
    return {name: loader.pattern(name) for name in loader.raw}


# -- matching --------------------------------------------------------------------------


def _select(rule: Rule, regions: list[Region]) -> list[Region]:
    chosen = rule.select.apply(regions)
    if rule.exclude is not None:
        excluded = {r.anchor for r in rule.exclude.apply(Selection(scope=rule.select.scope).apply(regions))}
        chosen = [r for r in chosen if r.anchor not in excluded]
    return chosen


def _without_overlaps(regions: list[Region], ctx: MatchContext) -> tuple[list[Region], list[tuple[Region, str]]]:
    kept: list[Region] = []
    dropped = []
    for region in sorted(regions, key=lambda r: (min(ctx.order[n] for n in r.nodes), -len(r.nodes))):
        # what no graph input reaches may be shared (a relative-position MLP computed once for all blocks)
        inner = (region.nodes - set(region.inputs)) & ctx.input_dependent()
        clash = next((k for k in kept if inner & (k.nodes - set(k.inputs))), None)
        if clash is None:
            kept.append(region)
        else:
            dropped.append((region, f"overlaps the region kept at {clash.scope or 'the model'}"))
    return sorted(kept, key=lambda r: ctx.order[r.anchor]), dropped


def match_rules(gm: fx.GraphModule, rules: RuleSet, ctx: MatchContext | None = None) -> list[RuleMatch]:
    ctx = ctx or MatchContext(gm)
    results: list[RuleMatch] = []
    for rule in rules.rules:
        matched = [(r.rule.name, len(r.regions)) for r in results if r.rule.name in rule.fallback_for and r.regions]
        if matched:
            results.append(
                RuleMatch(
                    rule,
                    [],
                    0,
                    [],
                    standby=f"a fallback for rule '{matched[0][0]}', which matched {matched[0][1]} region(s)",
                )
            )
            continue
        found = ctx.regions(rule.pattern)
        kept, dropped = _without_overlaps(_select(rule, found), ctx)
        results.append(RuleMatch(rule, kept, len(found), dropped))
    return results
