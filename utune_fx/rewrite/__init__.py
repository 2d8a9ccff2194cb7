"""Rewriting: insert the tuners the rules name into a traced graph.

    y = OP(x)  ->  parallel:         y' = y + U(x)     (U reads the region's input)
                   sequential:       y' = y + U(y)     (U reads the region's output)
                   reparameterised:  y' = y + U(x)     (OP one linear/conv, U = LoRA on it)
                   prefix, prompt:   A' = A + ...      (on an attention's output A; attention_sites.py)
                   none:             nothing inserted; existing parameters train
                                     (bitfit: biases, head: the classifier, full: all)

Every user of y then reads y', so regions inside residual branches and
outputs with several users are rewritten alike. Each rule is one graph pass
that lints and recompiles. Afterwards only tuner parameters and the
parameters the rules select train; everything else is frozen. Tuners start
as identity, so the rewritten model computes exactly what the frozen model
computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from utune_fx.errors import UtuneError
from utune_fx.match import MatchContext, RuleSet, match_rules
from utune_fx.match.report import match_report
from utune_fx.rewrite.bypass import chain_sizes
from utune_fx.rewrite.insertion import TUNER_SUMS
from utune_fx.rewrite.passes import apply_rule
from utune_fx.rewrite.plan import bytes_per_parameter, dry_run_refusal, site_refusal
from utune_fx.tied import newly_trained_ties

__all__ = ["RewriteResult", "RuleSummary", "rewrite"]


@dataclass
class RuleSummary:
    rule: str
    tuner: str
    position: str
    regions: int
    added_parameters: int  # new tuner parameters
    trained_parameters: int  # existing parameters this rule made trainable
    scopes: list[str] = field(default_factory=list)
    where: str = ""  # the rule's file:line:column
    tied: list[list[str]] = field(default_factory=list)  # tied names it trains, the one it selected first


@dataclass
class RewriteResult:
    module: fx.GraphModule
    summaries: list[RuleSummary]
    base_parameters: int
    rule_sets: list[RuleSet] = field(default_factory=list)
    source: Any = None  # artifact.TunedSource, when known: what save_tuned records
    data_config: dict | None = None  # timm's input settings of the base model (size, mean, std, ...)
    example_inputs: tuple = ()  # the inputs it was traced with (export and benchmarks reuse their shapes)
    base_model: Any = None  # the eager model it was traced from (shares the frozen weights)
    empty_rules: list[tuple[str, str]] = field(default_factory=list)  # (rule file, rule) that select nothing
    standby: list[tuple[str, str, str]] = field(default_factory=list)  # (rule, its file:line, why it tunes nothing)

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    @property
    def trainable_share(self) -> float:
        return self.trainable_parameters / self.base_parameters if self.base_parameters else 0.0


def rewrite(gm: fx.GraphModule, rule_sets: RuleSet | Sequence[RuleSet], seed: int = 0) -> RewriteResult:
    """Insert every rule's tuners into ``gm`` (in place, like PEFT's get_peft_model:
    the graph and the base parameters it shares with the model are frozen). Tuners are
    initialised from ``seed`` (the caller's RNG is left as it was), so the same rules on
    the same model start from the same tuners whatever ran before.

    First the dry run ``cli.py match`` shows (plan.py), on the frozen graph: a region the rewriter
    cannot take, or tuners the machine cannot hold, is a UtuneError with the line ``match`` prints,
    before anything is inserted or allocated. Rules that select nothing are listed in
    ``empty_rules`` (the CLI refuses them unless --allow-empty)."""
    rule_sets = [rule_sets] if isinstance(rule_sets, RuleSet) else list(rule_sets)
    base = sum(p.numel() for p in gm.parameters())
    ctx = MatchContext(gm)
    per_set = [(rules, match_rules(gm, rules, ctx)) for rules in rule_sets]  # all on the frozen graph
    reports = [match_report(gm, gm, rules, "", site_refusal, ctx, found, chain_sizes) for rules, found in per_set]
    refusal = dry_run_refusal(reports, bytes_per_parameter(gm))
    if refusal is not None:
        raise UtuneError(refusal)
    empty = [(rules.path, name) for rules, report in zip(rule_sets, reports) for name in report["empty_rules"]]
    # a rule that stands by (a fallback whose rule matched, a head rule on a backbone) does nothing
    matched = [found for _, founds in per_set for found in founds if not found.standby]
    standby = [(f.rule.name, f.rule.where, f.standby) for _, founds in per_set for f in founds if f.standby]
    for parameter in gm.parameters():
        parameter.requires_grad_(False)
    summaries = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for found in matched:
            trainable = {id(p) for p in gm.parameters() if p.requires_grad}
            added, trained = apply_rule(gm, found, ctx)
            gm.graph.lint()
            gm.recompile()
            summaries.append(
                RuleSummary(
                    found.rule.name,
                    found.rule.tuner,
                    found.rule.position,
                    len(found.regions),
                    added,
                    trained,
                    [r.scope for r in found.regions],
                    found.rule.where,
                    newly_trained_ties(gm, trainable, [r.scope for r in found.regions]),
                )
            )
    gm.meta.pop(TUNER_SUMS, None)  # insertion's bookkeeping, holding nodes: not for copies of the graph
    return RewriteResult(gm, summaries, base, rule_sets, empty_rules=empty, standby=standby)
