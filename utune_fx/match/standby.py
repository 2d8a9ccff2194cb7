"""When a rule stands by instead of tuning (or of failing as a rule that matches nothing).

    fallback_for: lora, and lora matched 48 regions     -> stands by: not needed
    fallback_for: lora, lora matched nothing, but the   -> stands by: not applied, the model has
      model has attention (an attention op, softmax(QK^T)V attention; lora stays a rule that
      written out, an opaque *Attention module)            matches nothing (exit 3)
    tuner: head, its pattern finds no classifier at all,-> stands by: the model has no classifier
      the file's other rules tune the model                (a backbone: GPT2Model, BertModel)

A fallback tunes every layer of networks the rules above it do not understand
(rules/lora.yaml: every layer of a VGG); on a model with attention those rules
missed the attention, and a blanket fallback would quietly tune something else.
The evidence of attention is looked for beyond the patterns, since the patterns
are what missed it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from torch import fx

from utune_fx.match.patterns import MatchContext
from utune_fx.trace import node_info
from utune_fx.trace.opkinds import matmul_operands

if TYPE_CHECKING:
    from utune_fx.match.rules import RuleMatch

_ATTENTION_NAME = re.compile(r"atten|attn", re.IGNORECASE)


def _where(node: fx.Node) -> str:
    info = node_info(node)
    return f"{info.scope} ({info.scope_class})" if info.scope else f"node {node.name} of the model's own forward"


_NORMALISERS = ("exp", "softmax", "_softmax", "sigmoid")
_SCORE_STEPS = 12  # ops between Q K^T and A V: scaling, masking, a written-out softmax


def _activation_product(node: fx.Node, live: set[fx.Node]) -> bool:
    operands = [a for a in matmul_operands(node) if isinstance(a, fx.Node)]
    return len(operands) >= 2 and all(a in live for a in operands)


def _normalised_scores(node: fx.Node, live: set[fx.Node]) -> bool:
    """A V: one operand of this product comes, through an exp (softmax, sigmoid), from another product
    of two activations (Q K^T). A bilinear transform (BAT) or a state-space scan (EfficientViM)
    multiplies activations too, but never normalises such a product."""
    frontier = [(a, False) for a in matmul_operands(node) if isinstance(a, fx.Node)]
    seen: set[tuple[fx.Node, bool]] = set()
    for _ in range(_SCORE_STEPS):
        next_frontier = []
        for current, normalised in frontier:
            if (current, normalised) in seen or current not in live:
                continue
            seen.add((current, normalised))
            info = node_info(current)
            if normalised and info.op_kind == "matmul" and _activation_product(current, live):
                return True
            normalised = normalised or info.op_kind == "softmax" or info.op_name in _NORMALISERS
            next_frontier.extend((i, normalised) for i in current.all_input_nodes)
        frontier = next_frontier
    return False


def attention_evidence(ctx: MatchContext) -> str | None:
    """Where the model computes attention, whether or not a pattern found it; None if nowhere."""
    for node in ctx.by_kind.get("attention", []):
        return f"an attention operation at {_where(node)}"
    live = ctx.input_dependent()
    for node in ctx.by_kind.get("matmul", []):
        if _activation_product(node, live) and _normalised_scores(node, live):
            return f"a product of two activations normalised by exp (attention's softmax(Q K^T) V) at {_where(node)}"
    for node in ctx.by_kind.get("opaque", []):
        if _ATTENTION_NAME.search(node_info(node).scope_class or str(node.target)):
            return f"the opaque module {_where(node)}"
    return None


def fallback_standby(fallback_for: list[str], earlier: list[RuleMatch], ctx: MatchContext) -> str | None:
    """Why a fallback for the rules ``fallback_for`` does not apply, or None when it does."""
    matched = [(r.rule.name, len(r.regions)) for r in earlier if r.rule.name in fallback_for and r.regions]
    if matched:
        return f"not needed, a fallback for rule '{matched[0][0]}', which matched {matched[0][1]} region(s)"
    evidence = attention_evidence(ctx)
    if evidence is not None:
        return (
            f"not applied: a fallback never tunes a model with attention, and this one has {evidence}, which "
            f"rule(s) {', '.join(fallback_for)} did not find; write a rule for it (docs/rules.md)"
        )
    return None


def head_standby(found: RuleMatch, results: list[RuleMatch]) -> str | None:
    """Why a head rule (tuner: head, no num_classes) that finds no classifier anywhere is no failure:
    the model has none (a backbone) and the file's other rules tune it. None when it is one."""
    rule = found.rule
    if rule.tuner != "head" or found.candidates or getattr(rule.config, "num_classes", None):
        return None
    others = [r.rule.name for r in results if r is not found and r.regions and not r.standby]
    if not others:
        return None
    return (
        f"skipped: the model has no classifier (pattern '{rule.pattern.name}' finds nothing in it): a "
        "backbone, or a language model, whose head predicts tokens and stays frozen; "
        f"and the file's other rules ({', '.join(others)}) tune it"
    )
