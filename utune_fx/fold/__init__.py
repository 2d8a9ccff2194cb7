"""Folding: merge the tuners that are linear in the operation they sit on into the frozen weights.

    y = linear(x);  u = utune.lora.0(x);  y2 = y + u;  ... reads y2
  ->
    y = linear'(x);  ... reads y       (W' = W + s B A; the tuner's nodes and module are gone)

What folds (see merges.py for the algebra):
    lora                                  into its linear or conv (grouped and depthwise too)
    parallel adapter, identity activation into the one linear or conv its region is
    sequential adapter (identity act.),   into the linear, conv or norm that computes
    scale_shift                           the region's output
    bitfit, head, full                    nothing to do: they train the model's own weights
    prompts, prefixes                     their keys and values become constant tensors
                                          (constants.py); the gated attention over them stays
Everything else stays as a branch, and the report says why (e.g. a ReLU adapter
parallel to a whole attention is not linear in it).

``fold`` works on a deep copy: the tuned model, its artifact and the base weights
are never changed. Merges are computed in float32 and cast back to each weight's
dtype. After folding a LoRA-only tuning the graph is the traced base graph again:
the same nodes, the same parameter names and shapes.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from utune_fx.errors import UtuneError
from utune_fx.fold import merges
from utune_fx.fold.constants import fold_constants, remove_dead_tuner_nodes
from utune_fx.fold.layers import channel_axis, fold_target, layer_behind, layer_uses
from utune_fx.match.sizes import layer_input
from utune_fx.rewrite.attention_sites import TUNER_META
from utune_fx.tied import tied_tensors
from utune_fx.trace import node_info
from utune_fx.trace.annotate import set_training
from utune_fx.tuners.adapters import Adapter
from utune_fx.tuners.bypass import BypassJoin, BypassStep
from utune_fx.tuners.lora import LoraBranch
from utune_fx.tuners.prefix import GatedConcatAttention, _PrefixTokens
from utune_fx.tuners.prompts import PromptTokens
from utune_fx.tuners.scale_shift import ScaleShift

__all__ = [
    "FoldEntry",
    "FoldResult",
    "all_zero",
    "fold",
    "floating_outputs",
    "folded_difference",
    "non_finite",
    "relative_difference",
]

FOLDED, CONSTANT, IN_PLACE, KEPT = "folded", "constant", "in place", "kept"


@dataclass
class FoldEntry:
    rule: str
    tuner: str
    module: str  # the tuner's module path, or the rule's scopes for tuners without a module
    status: str  # folded | constant | in place | kept
    reason: str


@dataclass
class FoldResult:
    module: fx.GraphModule
    entries: list[FoldEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # checks that passed but say nothing (all-zero outputs)

    def count(self, status: str) -> int:
        return sum(entry.status == status for entry in self.entries)

    def to_json(self) -> list[dict]:
        return [asdict(entry) for entry in self.entries]


@dataclass
class _Wiring:
    """How the rewriter joined a tuner call: users read ``total`` = ``writes`` + update."""

    call: fx.Node
    update: fx.Node  # the call, or its reshape_as
    total: fx.Node
    writes: fx.Node


def _wiring(call: fx.Node) -> _Wiring | None:
    update = call
    if len(call.users) == 1 and next(iter(call.users)).target == "reshape_as":
        update = next(iter(call.users))
    adds = [u for u in update.users if u.target is operator.add and len(u.args) == 2 and u.args[1] is update]
    if len(adds) != 1 or len(update.users) != 1:
        return None
    return _Wiring(call, update, adds[0], adds[0].args[0])


def _name(node: fx.Node) -> str:
    """A layer's scope (module path), or its node name for functional calls."""
    return str(node.target) if node.op == "call_module" else node_info(node).scope or node.name


def _tuner_axis(tuner: nn.Module) -> int:
    if isinstance(tuner, ScaleShift):
        return tuner.axis
    return 1 if isinstance(getattr(tuner, "down", None), nn.modules.conv._ConvNd) else -1


def _merge(gm: fx.GraphModule, tuner: nn.Module, wiring: _Wiring, uses: Counter, tied: dict) -> str | None:
    """Fold one tuner into its layer; None when done, else why not (``tied``: utune_fx.tied.tied_tensors)."""
    if wiring.update is not wiring.call:
        return "its output is reshaped to the region's (tokens read in one layout, written in another)"
    if isinstance(tuner, Adapter) and not merges.is_identity(tuner.act):
        return f"its activation {type(tuner.act).__name__} makes U(x) nonlinear in x"
    reads = wiring.call.args[0] if wiring.call.args else None
    position = wiring.call.meta[TUNER_META]["position"]
    layer_node = layer_behind(wiring.writes)
    if position == "parallel" and (not isinstance(reads, fx.Node) or reads is not layer_input(layer_node)):
        return "its region is more than one linear or conv (U(x) runs beside a whole subgraph)"
    target = fold_target(layer_node, gm, uses)
    layer = target.layer
    if layer is None:
        return target.reason
    shared = [tied[id(t)] for t in (getattr(layer, "weight", None), getattr(layer, "bias", None)) if id(t) in tied]
    if shared:  # one tensor under several names: the other modules read it too
        return f"{_name(layer_node)} is tied (one tensor: {', '.join(shared[0])}); folding would change every use"
    if position != "reparameterised":
        if channel_axis(layer, layer_node) != _tuner_axis(tuner):
            return f"it acts on another axis than the channels of {_name(layer_node)}"
        if not target.can_add_bias:
            return f"{_name(layer_node)} is called without a bias, so it cannot absorb the tuner's shift"
    if isinstance(tuner, LoraBranch):
        return merges.merge_lora(layer, tuner)
    if position == "parallel" and isinstance(tuner, Adapter):
        return merges.merge_parallel_adapter(layer, tuner)
    if position == "sequential":
        affine = merges.sequential_affine(tuner)
        return affine if isinstance(affine, str) else merges.merge_after(layer, *affine)
    return f"no merge rule for {type(tuner).__name__} at the {position} position"


def _unwire(gm: fx.GraphModule, wiring: _Wiring) -> None:
    wiring.total.replace_all_uses_with(wiring.writes)
    gm.graph.erase_node(wiring.total)
    if wiring.update is not wiring.call:
        gm.graph.erase_node(wiring.update)
    gm.graph.erase_node(wiring.call)


def _branch_reason(tuner: nn.Module, constant: bool) -> tuple[str, str]:
    if isinstance(tuner, PromptTokens):
        if constant:
            return CONSTANT, "the prompts and the keys/values the block makes of them are constant tensors"
        return KEPT, "shallow prompts attend to the image tokens, so they change with the input"
    if isinstance(tuner, GatedConcatAttention):
        return KEPT, "attention over the extra keys is nonlinear in the input; its gate and inputs stay"
    if isinstance(tuner, _PrefixTokens):
        return KEPT, "attention over the prefix is nonlinear in the input; K_p and V_p are now constant tensors"
    if isinstance(tuner, (BypassStep, BypassJoin)):
        return KEPT, "a side network beside the backbone (normalised, nonlinear): no weight of the backbone computes it"
    return KEPT, ""


def fold(module: fx.GraphModule, summaries: list | None = None) -> FoldResult:
    """Fold a rewritten model's tuners (on a copy); ``summaries``: the rewrite's rule summaries,
    to list the tuners that train existing weights (bitfit, head, full)."""
    gm = copy.deepcopy(module)
    set_training(gm, False)  # not eval(): graphs of the torch.export front end refuse it
    for parameter in gm.parameters():
        parameter.requires_grad_(False)
    entries: list[FoldEntry] = []
    calls = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and TUNER_META in n.meta and str(n.target).startswith("utune.")
    ]
    kept: list[tuple[fx.Node, nn.Module]] = []
    uses = layer_uses(gm.graph)  # merges remove only tuner nodes, so the frozen layers' counts hold
    tied = tied_tensors(gm)
    for call in calls:
        tag, tuner = call.meta[TUNER_META], gm.get_submodule(str(call.target))
        wiring = _wiring(call) if isinstance(tuner, (LoraBranch, Adapter, ScaleShift)) else None
        reason = _merge(gm, tuner, wiring, uses, tied) if wiring is not None else None
        if wiring is not None and reason is None:
            _unwire(gm, wiring)
            entries.append(
                FoldEntry(
                    tag["rule"],
                    tag["tuner"],
                    str(call.target),
                    FOLDED,
                    "merged into " + _name(layer_behind(wiring.writes)),
                )
            )
            continue
        if isinstance(tuner, _PrefixTokens):
            tuner.freeze()
        kept.append((call, tuner))
        if reason is not None:
            entries.append(FoldEntry(tag["rule"], tag["tuner"], str(call.target), KEPT, reason))
    constant_calls = fold_constants(gm)
    for call, tuner in kept:
        if any(e.module == str(call.target) for e in entries):
            continue
        tag = call.meta[TUNER_META]
        status, reason = _branch_reason(tuner, str(call.target) in constant_calls)
        if status == CONSTANT:  # now a buffer; the module stays only as the parent of its gates
            for name in [name for name, _ in tuner.named_parameters(recurse=False)]:
                delattr(tuner, name)
        entries.append(
            FoldEntry(
                tag["rule"],
                tag["tuner"],
                str(call.target),
                status,
                reason or f"{type(tuner).__name__} has no merge rule",
            )
        )
    for summary in summaries or []:
        if summary.position == "none":
            entries.append(
                FoldEntry(
                    summary.rule,
                    summary.tuner,
                    ", ".join(summary.scopes) or "model",
                    IN_PLACE,
                    "it trains the model's own weights, which are already in place",
                )
            )
    remove_dead_tuner_nodes(gm)
    gm.graph.lint()
    gm.recompile()
    return FoldResult(gm, entries)


def folded_difference(
    tuned: nn.Module, folded: nn.Module, inputs: tuple[torch.Tensor, ...], warnings: list[str] | None = None
) -> float:
    """Largest |folded - tuned| over the outputs, relative to the largest |tuned|. Outputs that are not
    finite are a UtuneError (NaN against NaN is no match); all-zero tuned outputs add a line to
    ``warnings``: the check then compares zeros with zeros and says nothing."""
    with torch.no_grad():
        modes = {m: m.training for m in tuned.modules()}
        set_training(tuned, False)
        expected, actual = tuned(*inputs), folded(*inputs)
        for m, mode in modes.items():
            m.training = mode
    for outputs, which in ((expected, "tuned"), (actual, "folded")):
        problem = non_finite(floating_outputs(outputs))
        if problem is not None:
            raise UtuneError(
                f"the {which} model's outputs on the example inputs hold {problem}, so folding cannot be "
                "checked: a tuner setting or trained weight is not finite; rewrite or train it again"
            )
    if warnings is not None and all_zero(floating_outputs(expected)):
        warnings.append(
            "the tuned model's outputs on the example inputs are all zero, so the folded-vs-tuned check "
            "says nothing about the fold; check the model's weights (a zeroed classifier?)"
        )
    return relative_difference(actual, expected)


def floating_outputs(value) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output, however nested (tuples, dicts, dataclasses)."""
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def non_finite(tensors: list[torch.Tensor]) -> str | None:
    """'2 NaN and 0 infinite of 20 values' when floating tensors hold values that are not finite, else None."""
    tensors = [t for t in tensors if t.is_floating_point()]
    nan = sum(int(torch.isnan(t).sum()) for t in tensors)
    infinite = sum(int(torch.isinf(t).sum()) for t in tensors)
    if not nan and not infinite:
        return None
    return f"{nan:,} NaN and {infinite:,} infinite of {sum(t.numel() for t in tensors):,} values"


def all_zero(tensors: list[torch.Tensor]) -> bool:
    """Floating outputs that are all zero: a comparison against them passes whatever the other side is near 0."""
    tensors = [t for t in tensors if t.is_floating_point()]
    return bool(tensors) and not any(bool(t.any()) for t in tensors)


def relative_difference(actual, expected) -> float:
    """Largest |actual - expected| over the floating outputs, relative to the largest |expected|;
    computed in float64. Infinite when either side holds NaN or infinities: comparisons of values
    that are not finite never pass a tolerance (NaN would compare as neither larger nor smaller)."""
    pairs = list(zip(floating_outputs(actual), floating_outputs(expected)))
    if non_finite([t for pair in pairs for t in pair]) is not None:
        return math.inf
    scale = max((float(e.abs().max()) for _, e in pairs if e.numel()), default=0.0) or 1.0
    return max((float((a.double() - e.double()).abs().max()) for a, e in pairs if e.numel()), default=0.0) / scale
