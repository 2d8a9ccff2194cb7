"""Matching: declarative rule files and the pattern matcher over traced graphs.

    rules = load_rules("rules/dual_utuner.yaml")   # validated; errors name file:line:col
    for found in match_rules(gm, rules):           # per rule: regions, candidates, dropped
        ...
    find_operations(gm)                            # the prelude's operations, by kind

The prelude (``prelude.yaml`` here) defines the operation patterns every
rule file can name: attention, mlp, ffn, block, residual, linear, conv,
norm, head. docs/rules.md is the reference and tutorial.
"""

from __future__ import annotations

from dataclasses import replace

from torch import fx

from utune_fx.match.patterns import MatchContext
from utune_fx.match.rules import RuleMatch, RuleSet, load_prelude, load_rules, match_rules
from utune_fx.match.source import RuleError
from utune_fx.match.structure import Region, common_scope

__all__ = [
    "MatchContext",
    "Region",
    "RuleError",
    "RuleMatch",
    "RuleSet",
    "TARGETS",
    "common_scope",
    "find_operations",
    "load_prelude",
    "load_rules",
    "match_rules",
]

# The prelude patterns `cli.py inspect` lists, in this order.
TARGETS = ("attention", "mlp", "ffn", "block", "residual", "head", "linear", "conv", "norm")


def find_operations(gm: fx.GraphModule, ctx: MatchContext | None = None) -> dict[str, list[Region]]:
    """Regions of every target pattern; blocks say how many attention / mlp they hold."""
    ctx = ctx or MatchContext(gm)
    prelude = load_prelude()
    found = {name: list(ctx.regions(prelude[name])) for name in TARGETS}
    anchors = {kind: {r.anchor for r in found[kind]} for kind in ("attention", "mlp")}
    found["block"] = [
        replace(block, contains={k: len(a & block.nodes) for k, a in anchors.items() if a & block.nodes})
        for block in found["block"]
    ]
    return found
