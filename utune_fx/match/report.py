"""The dry run behind ``cli.py match``: what each rule would tune, and at what cost.

RuleSet + annotated graph --match_report--> dict (JSON-ready)
dict --render_match--> per rule: regions (scope, shapes, parameters), totals;
                       with explain: candidates, selection, dropped overlaps,
                       and for an empty rule the closest near-miss

``check`` is the rewriter's site check (utune_fx.rewrite.plan.site_refusal; passed in, since
matching does not import the rewriter): a region it refuses carries the reason, and the report
lists every refusal, so ``match`` and ``rewrite`` fail alike. ``rewrite`` runs this report too.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import fx, nn

from utune_fx.match.patterns import MatchContext
from utune_fx.match.rules import RuleMatch, RuleSet, match_rules
from utune_fx.match.sizes import parameters_of, region_size
from utune_fx.match.structure import Region
from utune_fx.tied import tied_to
from utune_fx.trace import trace_report
from utune_fx.tuners import RegionSize

# (rule match, region, context, its size) -> the line the rewriter would refuse it with, or None
SiteCheck = Callable[[RuleMatch, Region, MatchContext, RegionSize], "str | None"]
# the sizes of a rule whose tuners depend on each other (a bypass ladder: the state it carries, where it joins)
ChainSizes = Callable[[RuleMatch, MatchContext, list[RegionSize]], list[RegionSize]]


_SHOWN_REFUSALS = 5  # refused regions a rule shows by their reason


def _shape(shape: Any) -> str:
    return "x".join(map(str, shape)) if shape else "-"


def _trace_settings(gm: fx.GraphModule) -> list[str]:
    try:
        return trace_report(gm).settings
    except KeyError:  # a graph annotated without trace()
        return []


def _trains(found: RuleMatch, ctx: MatchContext) -> list[str]:
    """Names of the existing parameters the rule trains, as the rewriter selects them: its regions'
    at position none (biases only, for bitfit), and what its 'train' key names."""
    rule = found.rule
    held = [name for region in found.regions for node in region.nodes for name in parameters_of(node, ctx)]
    selections = list(rule.train) + (["biases" if rule.tuner == "bitfit" else "all"] if rule.position == "none" else [])
    names = []
    for item in selections:
        if item in ("biases", "all"):
            names += [name for name in held if item == "all" or name.endswith("bias")]
        else:
            names += [n for n, _ in ctx.gm.named_parameters(remove_duplicate=False) if fnmatch.fnmatchcase(n, item)]
    return list(dict.fromkeys(names))


def match_report(
    gm: fx.GraphModule,
    model: nn.Module,
    rules: RuleSet,
    name: str,
    check: SiteCheck | None = None,
    ctx: MatchContext | None = None,
    matched: list[RuleMatch] | None = None,
    chained: ChainSizes | None = None,
) -> dict[str, Any]:
    """The report of ``rules`` on ``gm``; ``ctx`` and ``matched``: a context and matches already made."""
    ctx = ctx or MatchContext(gm)
    base = sum(p.numel() for p in model.parameters())
    entries, refusals = [], []
    matched = match_rules(gm, rules, ctx) if matched is None else matched
    for found in matched:
        rule = found.rule
        regions = []
        sizes = [region_size(region, ctx, position) for position, region in enumerate(found.regions)]
        if chained is not None:
            sizes = chained(found, ctx, sizes)
        for region, size in zip(found.regions, sizes):
            refused = check(found, region, ctx, size) if check is not None else None
            regions.append(
                {
                    **region.as_dict(),
                    "added_parameters": rule.config.added_parameters(size),
                    "trained_parameters": rule.config.trained_parameters(size),
                    **({"refused": refused} if refused else {}),
                }
            )
            if refused:
                refusals.append(refused)
        entry = {
            "rule": rule.name,
            "where": rule.where,
            "tuner": rule.tuner,
            "position": rule.position,
            "pattern": rule.pattern.name,
            "candidates": found.candidates,
            "regions": regions,
            "dropped": [{"scope": r.scope, "index": r.index, "reason": why} for r, why in found.dropped],
            "added_parameters": sum(r["added_parameters"] for r in regions),
            "trained_parameters": sum(r["trained_parameters"] for r in regions),
            "train": rule.train,
            "tied": tied_to(gm, _trains(found, ctx)) if found.regions else [],
            "fallback_for": rule.fallback_for,
        }
        if found.standby:
            entry["standby"] = found.standby
        elif not regions:
            entry["near_miss"] = (
                rule.pattern.explain(ctx)
                if not found.candidates
                else f"{found.candidates} region(s) matched the pattern; the rule's scope, "
                "layers or exclude selected none"
            )
        entries.append(entry)
    added = sum(e["added_parameters"] for e in entries)
    return {
        "model": name,
        "rules": rules.path,
        "trace_settings": _trace_settings(gm),
        "parameters": base,
        "results": entries,
        "added_parameters": added,
        "trained_parameters": sum(e["trained_parameters"] for e in entries),
        "added_share": added / base if base else 0.0,
        "empty_rules": empty_rules(matched),
        "refusals": refusals,
    }


def empty_rules(matched: list[RuleMatch]) -> list[str]:
    """Rules that select nothing; a fallback that applied covers the rule it stands in for."""
    covered = {name for found in matched if found.regions for name in found.rule.fallback_for}
    return [f.rule.name for f in matched if not f.regions and not f.standby and f.rule.name not in covered]


def empty_rules_error(empty: list[tuple[str, str]], model: str) -> str:
    """The line ``match`` and ``rewrite`` both exit 3 with; ``empty``: (rule file, rule name) pairs."""
    by_file: dict[str, list[str]] = {}
    for path, rule in empty:
        by_file.setdefault(path, []).append(rule)
    where = " and ".join(f"{', '.join(rules)} in {path}" for path, rules in by_file.items())
    return (
        f"rule(s) {where} match nothing in {model}; run cli.py match --explain to see the closest "
        "near-miss, or pass --allow-empty"
    )


def render_match(report: dict[str, Any], console: Console, explain: bool) -> None:
    console.print(
        f"[bold]{report['rules']}[/bold] on [bold]{report['model']}[/bold] ({report['parameters']:,} parameters)"
    )
    for setting in report["trace_settings"]:
        console.print(f"traced with {setting}", soft_wrap=True)
    for entry in report["results"]:
        regions = entry["regions"]
        head = (
            f"rule [bold]{entry['rule']}[/bold]: {entry['tuner']} at {entry['position']} on "
            f"'{entry['pattern']}' ({entry['where']})"
        )
        if "standby" in entry:
            console.print(f"{head}: {entry['standby']}", soft_wrap=True)
            continue
        if entry["fallback_for"]:
            head += f", the fallback for {', '.join(entry['fallback_for'])}"
        if not regions:
            console.print(f"{head}: [bold red]matches nothing[/bold red]")
            console.print(f"  {entry['near_miss']}" if explain else "  run with --explain to see the closest near-miss")
            continue
        cost = f"+{entry['added_parameters']:,} parameters" + (
            f", {entry['trained_parameters']:,} existing ones trained" if entry["trained_parameters"] else ""
        )
        console.print(f"{head}: {len(regions)} region(s), {cost}")
        trains = entry["trained_parameters"] > 0
        table = Table(box=None, pad_edge=False, show_header=True)
        for column in ("#", "scope", "in -> out", "+ params") + (("trained",) if trains else ()):
            table.add_column(
                column, justify="right" if column in ("#", "+ params", "trained") else "left", overflow="fold"
            )
        for region in regions:
            row = [
                str(region["index"]) + (" [bold red]refused[/bold red]" if "refused" in region else ""),
                region["scope"] or "(model)",
                f"{_shape(region['in_shape'])} -> {_shape(region['out_shape'])}",
                f"{region['added_parameters']:,}",
            ]
            table.add_row(*row, *([f"{region['trained_parameters']:,}"] if trains else []))
        console.print(table)
        refused = [region for region in regions if "refused" in region]
        for region in refused[:_SHOWN_REFUSALS]:
            console.print(f"  [bold red]refused[/bold red] #{region['index']}: {region['refused']}", soft_wrap=True)
        if len(refused) > _SHOWN_REFUSALS:
            console.print(f"  ... and {len(refused) - _SHOWN_REFUSALS} more refused region(s) (--json lists them)")
        if explain:
            console.print(
                f"  pattern '{entry['pattern']}' found {entry['candidates']} region(s); "
                f"the rule's selection kept {len(regions) + len(entry['dropped'])}"
            )
            for dropped in entry["dropped"]:
                console.print(f"  dropped #{dropped['index']} ({dropped['scope']}): {dropped['reason']}")
        if entry["train"]:
            console.print(f"  also trains: {', '.join(entry['train'])}")
        for names in entry["tied"]:
            console.print(f"  also trains {', '.join(names[1:])}: tied to {names[0]} (one tensor)", soft_wrap=True)
    total = sum(len(e["regions"]) for e in report["results"])
    console.print(
        f"[bold]total[/bold]: {total} region(s), +{report['added_parameters']:,} parameters "
        f"({100 * report['added_share']:.2f}% of the model)"
        + (f", {report['trained_parameters']:,} existing parameters trained" if report["trained_parameters"] else "")
    )
