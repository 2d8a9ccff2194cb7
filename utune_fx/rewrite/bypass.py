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

import operator
from dataclasses import dataclass

from torch import fx

from utune_fx.match import MatchContext, Region, RuleMatch
from utune_fx.match.structure import in_scope
from utune_fx.rewrite.attention_sites import fail
from utune_fx.rewrite.insertion import TUNER_SUMS, annotate, current
from utune_fx.rewrite.passes import parallel_input, placement, region_channels_first, whole_factor_stride
from utune_fx.trace import node_info
from utune_fx.tuners import Site
from utune_fx.tuners.bypass import BypassJoin, BypassStep


@dataclass(frozen=True)
class Rung:
    region: Region
    reads: fx.Node  # the stem's input (the first stem's starts the side state)
    writes: fx.Node  # the stem's output: the rung reads it detached; the join adds to the last one's
    site: Site


def _shape_text(shape) -> str:
    return "x".join(map(str, shape))


def _rung_site(found: RuleMatch, region: Region, state: tuple, out: tuple, channels_first: bool) -> Site:
    """The rung's site: the state's channels in, the stem's out, the stride the state's maps pool by."""
    if not state or not out:
        raise fail(found, region, "the bypass needs tensors in and out of the stem")
    rank = len(out)
    refusal = (
        f"the side state cannot follow this stem from {_shape_text(state)} to {_shape_text(out)}; "
        "res_tuning_bypass needs stems that keep their tokens or downsample feature maps by whole factors"
    )
    if len(state) != rank or state[0] != out[0] or rank < 2:
        raise fail(found, region, refusal)
    axis = 1 if channels_first else rank - 1
    spatial_in, spatial_out = (state[2:], out[2:]) if channels_first else (state[1:-1], out[1:-1])
    stride = None
    if spatial_in != spatial_out:
        # tokens [B, N, C] carry no layout to pool by; maps [B, C, H, W] and [B, H, W, C] do
        if channels_first or rank >= 4:
            stride = whole_factor_stride((out[0], 1, *spatial_in), (out[0], 1, *spatial_out))
        if stride is None:
            raise fail(found, region, refusal)
    return Site(state[axis], out[axis], rank, channels_first, stride=stride)


def _passed_on(region: Region, output: fx.Node, channels_first: bool) -> fx.Node:
    """The stem's output as the model passes it on: through what its only reader does to it that keeps
    the batch and the channels, while that reader still belongs to the stem's module (a ResNet block's
    ReLU after its residual add) or only moves the layout (Swin's block adds its residual on
    [B, H*W, C] and returns [B, H, W, C])."""
    node, axis = output, 1 if channels_first else -1
    for _ in range(8):
        users = list(node.users)
        if len(users) != 1:
            break
        user = users[0]
        if not in_scope(user, region.scope) and node_info(user).op_kind not in ("reshape", "permute"):
            break
        before, after = node_info(node).shape, node_info(user).shape
        if not before or not after or len(after) < 3 or after[0] != before[0] or after[axis] != before[axis]:
            break
        node = user
    return node


def ladder(found: RuleMatch, ctx: MatchContext) -> list[Rung]:
    """The rungs in graph order, each with its site; a one-line UtuneError for a stem the ladder cannot
    follow (the dry run calls this too)."""
    stems = sorted(found.regions, key=lambda region: ctx.order[region.output])
    rungs: list[Rung] = []
    for region in stems:
        if not region.inputs:
            raise fail(found, region, "the stem reads no tensor (a model input or a constant); pick blocks")
        reads, writes = parallel_input(region, ctx)
        channels_first = region_channels_first(region, ctx, writes)
        writes = _passed_on(region, writes, channels_first)
        if rungs and ctx.order[reads] < ctx.order[rungs[-1].writes]:
            raise fail(
                found,
                region,
                f"this stem starts before {rungs[-1].region.scope} ends; a bypass needs stems that follow "
                "one another (select blocks, not regions inside them)",
            )
        state = node_info(rungs[-1].writes if rungs else reads).shape
        site = _rung_site(found, region, state, node_info(writes).shape, channels_first)
        rungs.append(Rung(region, reads, writes, site))
    return rungs


def insert_bypass(gm: fx.GraphModule, found: RuleMatch, ctx: MatchContext, safe: str) -> int:
    """Build the ladder and the join into ``gm``; returns the parameters added."""
    rule, graph = found.rule, gm.graph
    rungs = ladder(found, ctx)
    sums = gm.meta.setdefault(TUNER_SUMS, {})
    where = placement(rungs[0].region, ctx, rungs[0].writes)
    ours: set[fx.Node] = set()

    def tag(index: int) -> dict:
        return {"rule": rule.name, "tuner": rule.tuner, "position": rule.position, "index": index}

    def detach(node: fx.Node, index: int) -> fx.Node:
        with graph.inserting_after(node):
            cut = graph.call_method("detach", (node,))
        annotate(cut, node, "identity", "detach", tag(index))
        ours.add(cut)
        return cut

    def call(path: str, module, args: tuple, index: int) -> fx.Node:
        gm.add_submodule(path, module.to(**where))
        with graph.inserting_after(args[0]):
            node = graph.call_module(path, args)
        annotate(node, args[0], "tuner", type(module).__name__, tag(index))
        ours.add(node)
        return node

    state = detach(current(rungs[0].reads, sums), 0)
    added = 0
    for index, rung in enumerate(rungs):
        feature = detach(current(rung.writes, sums), index)
        step = BypassStep(rule.config, rung.site)
        state = call(f"utune.{safe}.{index}", step, (feature, state), index)
        added += sum(p.numel() for p in step.parameters())
    last, site = current(rungs[-1].writes, sums), rungs[-1].site
    join = BypassJoin(rule.config, Site(site.channels_out, site.channels_out, site.rank, site.channels_first))
    joined = call(f"utune.{safe}.{len(rungs)}", join, (state,), len(rungs))
    with graph.inserting_after(joined):
        total = graph.call_function(operator.add, (last, joined))
    annotate(total, last, "add", "add", tag(len(rungs)))
    last.replace_all_uses_with(total, delete_user_cb=lambda user: user not in ours and user is not total)
    sums[last] = total
    return added + sum(p.numel() for p in join.parameters())
