"""The bypass pass: Res-Tuning-Bypass's side ladder over a rule's stems (formula: tuners/bypass.py).

    before:  x0 -> stem_1 -> x1 -> ... -> stem_L -> xL -> norm -> head
    after:   s0 = detach(x0)
             f1 = detach(x1);  s1 = utune.<rule>.0(f1, s0)          (a BypassStep per stem)
             ...
             fL = detach(xL);  sL = utune.<rule>.<L-1>(fL, s<L-1>)
             j = utune.<rule>.<L>(sL);  xL' = xL + j;  norm and head read xL'   (the BypassJoin)

The stems are the rule's regions in graph order; each must come after the one before. The side state
follows them: it keeps their tokens, or their feature maps downsampled by whole factors (a ResNet's or
Swin's next stage), and takes their channels; anything else is a one-line refusal naming the stem,
which the dry run (plan.py) shows before anything is inserted. Nothing the ladder computes flows back
into the backbone but through the join, so the backbone records nothing for backward.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace

from torch import fx

from utune_fx.errors import UtuneError
from utune_fx.match import MatchContext, Region, RuleMatch
from utune_fx.match.structure import in_scope
from utune_fx.rewrite.attention_sites import TUNER_META, fail
from utune_fx.rewrite.insertion import TUNER_SUMS, annotate, current
from utune_fx.rewrite.passes import parallel_input, placement, region_channels_first, whole_factor_stride
from utune_fx.trace import node_info
from utune_fx.tuners import RegionSize, Site
from utune_fx.tuners.bypass import BypassJoin, BypassStep


@dataclass(frozen=True)
class Rung:
    region: Region
    reads: fx.Node  # the stem's input (a chain's first stem starts its side state here)
    writes: fx.Node  # the stem's output: the rung reads it detached; a chain's last one is joined
    site: Site
    starts: bool  # the first stem of its chain
    relayout: bool = False  # the state takes the stem output's layout of the same tokens
    ends: bool = False  # the last stem of its chain: the join goes there


def _shape_text(shape) -> str:
    return "x".join(map(str, shape))


def _uniform_pool(tokens: tuple[int, ...], count: int) -> tuple[int, ...] | None:
    """The one whole factor per axis that pools maps of ``tokens`` down to ``count`` positions, if any."""
    total = math.prod(tokens)
    if len(tokens) < 2 or not count or total % count:
        return None
    factor = round((total // count) ** (1 / len(tokens)))
    if factor < 2 or factor ** len(tokens) != total // count or any(t % factor for t in tokens):
        return None
    return (factor,) * len(tokens)


def _rung_site(found: RuleMatch, region: Region, state: tuple, out: tuple, channels_first: bool) -> tuple[Site, bool]:
    """The rung's site (the state's channels in, the stem's out, the stride the state's maps pool by) and
    whether what it carries takes the stem's layout of the same tokens ([B, H*W, C] <-> [B, H, W, C])."""
    if not state or not out:
        raise fail(found, region, "the bypass needs tensors in and out of the stem")
    refusal = (
        f"the side state cannot follow this stem from {_shape_text(state)} to {_shape_text(out)}; "
        "res_tuning_bypass needs stems that keep their tokens or downsample feature maps by whole factors"
    )
    if state[0] != out[0] or min(len(state), len(out)) < 2:
        raise fail(found, region, refusal)
    if channels_first:
        stride = None
        if len(state) != len(out):
            raise fail(found, region, refusal)
        if state[2:] != out[2:]:
            stride = whole_factor_stride((out[0], 1, *state[2:]), (out[0], 1, *out[2:]))
            if stride is None:
                raise fail(found, region, refusal)
        return Site(state[1], out[1], len(out), True, stride=stride), False
    tokens_in, tokens_out = state[1:-1], out[1:-1]
    if tokens_in == tokens_out:
        return Site(state[-1], out[-1], len(out), False), False
    if math.prod(tokens_in) == math.prod(tokens_out):  # the same tokens in another layout (Hugging Face Swin)
        return Site(state[-1], out[-1], len(state), False), True
    # maps [B, H, W, C] pool by whole factors; tokens [B, N, C] carry no layout to pool by
    maps = len(tokens_in) >= 2
    stride = whole_factor_stride((out[0], 1, *tokens_in), (out[0], 1, *tokens_out)) if len(state) == len(out) else None
    stride = stride or _uniform_pool(tokens_in, math.prod(tokens_out))
    if stride is None or not maps:
        raise fail(found, region, refusal)
    pooled = tuple(t // f for t, f in zip(tokens_in, stride))
    return Site(state[-1], out[-1], len(state), False, stride=stride), pooled != tuple(tokens_out)


# what a stem's module may still do to its output after the region ends, and what moves its layout
_FINISHING = ("act", "dropout", "identity", "cast", "reshape", "permute")
_LAYOUT = ("reshape", "permute")


def _passed_on(region: Region, output: fx.Node, channels_first: bool) -> fx.Node:
    """The stem's output as the model passes it on: through what its only reader does to it that keeps
    the batch and the channels, while that is the stem's module finishing elementwise (a ResNet block's
    ReLU after its residual add) or a layout move (Swin's block adds its residual on [B, H*W, C] and
    returns [B, H, W, C])."""
    node, axis = output, 1 if channels_first else -1
    for _ in range(8):
        users = list(node.users)
        if len(users) != 1:
            break
        user, kind = users[0], node_info(users[0]).op_kind
        if kind not in _LAYOUT and not (kind in _FINISHING and in_scope(user, region.scope)):
            break
        before, after = node_info(node).shape, node_info(user).shape
        if not before or not after or len(after) < 3 or after[0] != before[0] or after[axis] != before[axis]:
            break
        node = user
    return node


def _reaches(source: fx.Node, target: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether ``target`` is computed from ``source`` (users only; nothing past ``target`` is visited)."""
    seen, stack = set(), [source]
    while stack:
        node = stack.pop()
        if node is target:
            return True
        if node in seen or order[node] > order[target]:
            continue
        seen.add(node)
        stack.extend(node.users)
    return False


def ladder(found: RuleMatch, ctx: MatchContext) -> list[Rung]:
    """The rungs in graph order, each with its site, in chains: a stem computed from the one before
    continues its chain; one that is not (a decoder after its encoder, a second tower) starts a new one
    with a side state and a join of its own. A one-line UtuneError for a stem no ladder can follow (the
    dry run calls this too)."""
    stems = sorted(found.regions, key=lambda region: ctx.order[region.output])
    rungs: list[Rung] = []
    for region in stems:
        if not region.inputs:
            raise fail(found, region, "the stem reads no tensor (a model input or a constant); pick blocks")
        reads, writes = parallel_input(region, ctx)
        channels_first = region_channels_first(region, ctx, writes)
        writes = _passed_on(region, writes, channels_first)
        if rungs and ctx.order[reads] < ctx.order[rungs[-1].writes] and _reaches(reads, rungs[-1].writes, ctx.order):
            raise fail(
                found,
                region,
                f"this stem reads what {rungs[-1].region.scope} is computed from; a bypass needs stems that "
                "follow one another (select blocks, not regions inside them or beside each other)",
            )
        starts = not rungs or not _reaches(rungs[-1].writes, reads, ctx.order)
        if starts and rungs:
            rungs[-1] = replace(rungs[-1], ends=True)
        state = node_info(reads if starts else rungs[-1].writes).shape
        site, relayout = _rung_site(found, region, state, node_info(writes).shape, channels_first)
        rungs.append(Rung(region, reads, writes, site, starts, relayout=relayout))
    if rungs:
        rungs[-1] = replace(rungs[-1], ends=True)
    return rungs


def chain_sizes(found: RuleMatch, ctx: MatchContext, sizes: list[RegionSize]) -> list[RegionSize]:
    """``match``'s sizes of a bypass rule's regions: the channels each rung's state comes in with and
    whether a join follows it, as the rewriter will build them (other rules' sizes are returned as given)."""
    if found.rule.position != "bypass":
        return sizes
    try:
        rungs = {id(rung.region): rung for rung in ladder(found, ctx)}  # regions are dataclasses: by identity
    except UtuneError:  # the refusal comes with the site check
        return sizes
    return [
        replace(size, previous_out=rungs[id(region)].site.channels_in, last=rungs[id(region)].ends)
        for region, size in zip(found.regions, sizes)
    ]


def insert_bypass(gm: fx.GraphModule, found: RuleMatch, ctx: MatchContext, safe: str) -> int:
    """Build the ladder and the join into ``gm``; returns the parameters added."""
    rule, graph = found.rule, gm.graph
    rungs = ladder(found, ctx)
    sums = gm.meta.setdefault(TUNER_SUMS, {})
    where = placement(rungs[0].region, ctx, rungs[0].writes)

    def tag(index: int) -> dict:
        return {"rule": rule.name, "tuner": rule.tuner, "position": rule.position, "index": index}

    def detach(node: fx.Node, index: int) -> fx.Node:
        with graph.inserting_after(node):
            cut = graph.call_method("detach", (node,))
        annotate(cut, node, "identity", "detach", tag(index))
        return cut

    def call(path: str, module, args: tuple, index: int) -> fx.Node:
        gm.add_submodule(path, module.to(**where))
        with graph.inserting_after(args[0]):
            node = graph.call_module(path, args)
        annotate(node, args[0], "tuner", type(module).__name__, tag(index))
        return node

    added, index, state = 0, 0, None
    for rung in rungs:
        if rung.starts:
            state = detach(current(rung.reads, sums), index)
        feature = detach(current(rung.writes, sums), index)
        step = BypassStep(rule.config, rung.site, relayout=rung.relayout)
        state = call(f"utune.{safe}.{index}", step, (feature, state), index)
        added, index = added + sum(p.numel() for p in step.parameters()), index + 1
        if rung.ends:
            added += _join(gm, rung, state, call(f"utune.{safe}.{index}", _join_module(rule, rung), (state,), index))
            index += 1
    return added


def _join_module(rule, rung: Rung) -> BypassJoin:
    site = rung.site
    return BypassJoin(rule.config, Site(site.channels_out, site.channels_out, site.rank, site.channels_first))


def _join(gm: fx.GraphModule, rung: Rung, state: fx.Node, joined: fx.Node) -> int:
    """x_L' = x_L + join(s_L): every reader of the chain's last output but the ladder reads the sum."""
    sums = gm.meta[TUNER_SUMS]
    last = current(rung.writes, sums)
    with gm.graph.inserting_after(joined):
        total = gm.graph.call_function(operator.add, (last, joined))
    annotate(total, last, "add", "add", joined.meta[TUNER_META])
    ladder_nodes = {n for n in last.users if TUNER_META in n.meta}  # its detach: the ladder reads the frozen value
    last.replace_all_uses_with(total, delete_user_cb=lambda user: user not in ladder_nodes and user is not total)
    sums[last] = total
    return sum(p.numel() for p in gm.get_submodule(str(joined.target)).parameters())
