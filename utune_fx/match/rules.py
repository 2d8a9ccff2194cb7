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
rules matched nothing and the model has no attention: LoRA on every layer
of a network that has neither attention nor residual blocks. A head rule
on a model without a classifier stands by when the file's other rules
matched (match/standby.py).
docs/rules.md is the reference.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import fx

from utune_fx.match import limits
from utune_fx.match.patterns import MatchContext, Pattern, compile_pattern
from utune_fx.match.selection import SELECT_KEYS, Selection, selection
from utune_fx.match.source import Located, RuleError, parse_located, read_rule_text
from utune_fx.match.standby import fallback_standby, head_standby
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

    def load_file(self, path: Path, imported_by: Located | None = None) -> Located:
        if imported_by is not None and len(self.loaded - {PRELUDE.resolve()}) >= limits.RULE_FILES.value():
            raise imported_by.over(f"more than {limits.RULE_FILES.value()} files", limits.RULE_FILES)
        text = read_rule_text(path)  # bounded: at most the byte limit is read
        root = parse_located(text, str(path))  # messages name the path as given
        entries = root.check_keys(TOP_KEYS)
        if "version" not in entries and path.resolve() != PRELUDE.resolve():
            raise root.fail(f"missing key 'version'; start the file with 'version: {VERSION}'")
        if "version" in entries and entries["version"].value != VERSION:
            raise entries["version"].fail(
                f"unsupported version {entries['version'].value!r}; this utune_fx reads version {VERSION}"
            )
        self.loaded.add(path.resolve())
        self.texts[path] = text
        for item in entries["imports"].items() if "imports" in entries else []:
            target = path.parent / item.name("an imported file name")
            if "\x00" in item.value:  # a path cannot hold it (resolve() would raise ValueError)
                raise item.fail("an imported file name cannot hold a NUL character")
            if target.resolve() in self.loaded:
                continue
            if not target.is_file():
                raise item.fail(f"imported file {item.value!r} not found next to {path.name}")
            self.load_file(target, item)
        for name, definition in entries["patterns"].mapping().items() if "patterns" in entries else []:
            if not name.isidentifier():
                raise definition.fail_key(f"pattern names are identifiers (letters, digits, _), not {name!r}")
            if name in self.raw:
                raise definition.fail_key(
                    f"pattern '{name}' is already defined at {self.raw[name].where}; pick another name"
                )
            if len(self.raw) >= limits.RULE_PATTERNS.value():
                what = f"more than {limits.RULE_PATTERNS.value()} patterns (the prelude's included)"
                raise definition.over(what, limits.RULE_PATTERNS, at_key=True)
            self.raw[name] = definition
        return root

    def resolve(self, value: Located) -> Pattern:
        if isinstance(value.value, str):
            name = value.name("a pattern name")
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
            if len(self.compiling) >= limits.PATTERN_REFERENCE_DEPTH.value():
                chain = " -> ".join(self.compiling[:3] + ["..."] + self.compiling[-2:] + [name])
                what = f"patterns refer to each other more than {len(self.compiling)} deep ({chain})"
                raise self.raw[name].over(what, limits.PATTERN_REFERENCE_DEPTH)
            self.compiling.append(name)
            self.compiled[name] = compile_pattern(self.raw[name], name, self.resolve)
            self.compiling.pop()
        return self.compiled[name]


def tuner_module_name(rule_name: str) -> str:
    """The name the rewriter gives a rule's tuner modules (``utune.<this>.<index>``): two rules
    with one module name would share modules, so load_rules refuses that."""
    return re.sub(r"\W", "_", rule_name)


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


def _rule(value: Located, loader: _Loader, names: dict[str, Located]) -> Rule:
    entries = value.check_keys(RULE_KEYS, required=("name", "match", "tuner"))
    name = entries["name"].name("a rule name")
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
        exclude = selection(entries["exclude"].check_keys(SELECT_KEYS))
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
        selection(entries),
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
    try:
        return _load_rule_set(Path(path))
    except (RecursionError, MemoryError) as error:  # a last resort: the limits above should come first
        raise RuleError(
            f"{path}:1:1: (top level): too deeply nested or too large to load ({type(error).__name__}); "
            "simplify the file, or lower the limit you raised (docs/limits.md)"
        ) from None


def _load_rule_set(path: Path) -> RuleSet:
    loader = _Loader()
    loader.load_file(PRELUDE)
    loader.compiled.update(load_prelude())  # shared, so contexts cache the prelude's regions once
    root = loader.load_file(path)
    entries = root.mapping()
    if "rules" not in entries:
        raise root.fail("missing key 'rules'; a rule file lists at least one rule")
    items = entries["rules"].items()
    if len(items) > limits.RULES_PER_FILE.value():
        limit = limits.RULES_PER_FILE
        raise items[limit.value()].over(f"more than {limit.value()} rules", limit)
    names: dict[str, Located] = {}  # rule name -> where it is defined
    modules: dict[str, str] = {}  # tuner module name -> rule name
    rules = []
    for item in items:
        rules.append(_rule(item, loader, names))
        name, module = rules[-1].name, tuner_module_name(rules[-1].name)
        if module in modules:
            raise item.mapping()["name"].fail(
                f"rules '{modules[module]}' ({names[modules[module]].where}) and '{name}' would share the tuner "
                f"modules 'utune.{module}.*' (characters other than letters, digits and _ become _); rename one"
            )
        names[name], modules[module] = item, name
    if not rules:
        raise entries["rules"].fail("the rules list is empty; add a rule")
    patterns = {name: loader.pattern(name) for name in loader.raw}  # compile all: errors surface at load
    folder = path.parent
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
    """Every rule's regions, in file order; a rule that stands by (match/standby.py) has none."""
    ctx = ctx or MatchContext(gm)
    results: list[RuleMatch] = []
    for rule in rules.rules:
        standby = fallback_standby(rule.fallback_for, results, ctx) if rule.fallback_for else None
        if standby is not None:
            results.append(RuleMatch(rule, [], 0, [], standby=standby))
            continue
        found = ctx.regions(rule.pattern)
        kept, dropped = _without_overlaps(_select(rule, found), ctx)
        results.append(RuleMatch(rule, kept, len(found), dropped))
    for found in results:
        if not found.regions and not found.standby:
            found.standby = head_standby(found, results)
    return results
