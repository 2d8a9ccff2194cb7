"""The graph pass for one rule: build each region's tuner and wire it in.

    parallel         %u = call_module[utune.<rule>.<i>](%x); %y2 = add(%y, %u); users of %y read %y2
    sequential       %u = call_module[utune.<rule>.<i>](%y); ...
    reparameterised  %u = call_module[utune.<rule>.<i>](%x_of_linear); ...  (an embedding's: its ids)
    prefix, prompt   see attention_sites.py
    none             requires_grad on the selected existing parameters

New nodes are annotated (op kind 'tuner' for the module call) and carry
``meta['utune_tuner']`` = {rule, tuner, position, index} for fold and export.
"""

from __future__ import annotations

import fnmatch
import math
import operator

import torch
from torch import fx, nn

from utune_fx.errors import UtuneError
from utune_fx.heads import start_fresh_head
from utune_fx.match import MatchContext, Region, RuleMatch
from utune_fx.match.predicates import data_inputs
from utune_fx.match.rules import tuner_module_name
from utune_fx.match.sizes import (
    conv_arguments,
    embedding_table,
    layer_channels,
    layer_input,
    left_product_input,
    normalises_axis_1,
    parameters_of,
)
from utune_fx.match.structure import in_scope
from utune_fx.rewrite.attention_sites import (
    TUNER_META,
    attention_call,
    attention_site,
    fail,
    insert_prompts,
)
from utune_fx.rewrite.insertion import insert_tuner
from utune_fx.trace import node_info
from utune_fx.tuners import TUNERS, ConvGeometry, Site

_WEIGHTED = ("linear", "conv")


def _first_weighted(region: Region, ctx: MatchContext) -> fx.Node | None:
    return min((n for n in region.nodes if node_info(n).op_kind in _WEIGHTED), key=ctx.order.__getitem__, default=None)


def _site(found: RuleMatch, region: Region, ctx: MatchContext, reads: fx.Node, writes: fx.Node) -> tuple[Site, bool]:
    """The tuner's site, and whether its output needs the output's view (Swin's
    blocks read [B, H, W, C] and write the same tokens as [B, H*W, C])."""
    channels_first = region_channels_first(region, ctx, writes)
    in_shape, out_shape = node_info(reads).shape, node_info(writes).shape
    if not in_shape or not out_shape:
        raise fail(found, region, "the tuner needs tensors in and out")
    axis = 1 if channels_first else -1
    channels_in, channels_out = in_shape[axis], out_shape[axis]
    other_in = [d for i, d in enumerate(in_shape) if i != axis % len(in_shape)]
    other_out = [d for i, d in enumerate(out_shape) if i != axis % len(out_shape)]
    same_tokens = not channels_first and math.prod(other_in) == math.prod(other_out)
    stride = whole_factor_stride(in_shape, out_shape) if channels_first and found.rule.position == "parallel" else None
    if other_in != other_out and not same_tokens and stride is None:
        shapes = f"{'x'.join(map(str, in_shape))} -> {'x'.join(map(str, out_shape))}"
        raise fail(
            found,
            region,
            f"{found.rule.tuner} at {found.rule.position} needs input and output of one "
            f"size but for the channels (or feature maps downsampled by whole factors), "
            f"got {shapes}; pick a region that keeps its size",
        )
    reshape = other_in != other_out and stride is None
    return Site(channels_in, channels_out, len(in_shape), channels_first, stride=stride), reshape


def region_channels_first(region: Region, ctx: MatchContext, writes: fx.Node) -> bool:
    """Whether the tensor a tuner writes at ``writes`` holds channels on axis 1 (feature maps) rather
    than last (tokens): a region that starts with a conv, unless its output joins as tokens."""
    anchor_op = _first_weighted(region, ctx)
    if anchor_op is not None:
        return node_info(anchor_op).op_kind == "conv" and not _tokens_again(region.output, writes)
    # no linear or conv: a norm of feature maps (BatchNorm, GroupNorm) still says where channels are
    return any(normalises_axis_1(n, ctx) for n in region.nodes)


def _tokens_again(output: fx.Node, writes: fx.Node) -> bool:
    """Whether a conv region's [B, C, L] output reaches the residual add it joins as [B, L, C]
    tokens (VITS' FFN convolves the tokens transposed): the tuner there works on the last axis."""
    out, joined = node_info(output).shape, node_info(writes).shape
    return bool(out and joined) and joined != out and list(joined) == [out[0], *out[2:], out[1]]


def whole_factor_stride(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Whole-factor downsampling of [B, C, *spatial] feature maps, as a 1x1 conv stride."""
    if len(in_shape) != len(out_shape) or len(in_shape) < 3 or in_shape[0] != out_shape[0]:
        return None
    pairs = list(zip(in_shape[2:], out_shape[2:]))
    if any(o == 0 or i % o or (i // o) * o != i for i, o in pairs) or all(i == o for i, o in pairs):
        return None
    # a 1x1 conv with stride s maps size i to ceil(i / s); whole factors keep it exact
    return tuple(i // o for i, o in pairs)


def _fits(reads: fx.Node, writes: fx.Node, loose: bool = False, channels_first: bool = False) -> bool:
    """The same tokens (or feature map) on both sides, the channels (axis 1 of feature maps, the
    last axis of tokens) aside; ``loose``: the same number of tokens in another layout ([B, C]
    for [B, 1, C]; nn.MultiheadAttention's one query [1, B, C] seq-first for its out_proj's [B, C]:
    the same axes but those of size 1, so the same order). A region of convs reads channels first,
    so [B, C, L + 2] padded for a kernel of 3 is no fit for [B, C, L] (VITS' convolutional FFN)."""
    a, b = node_info(reads).shape, node_info(writes).shape
    if channels_first and not loose:
        return bool(a and b) and len(a) == len(b) >= 3 and a[0] == b[0] and a[2:] == b[2:]
    if loose and a and b and [d for d in a[:-1] if d != 1] == [d for d in b[:-1] if d != 1]:
        return True
    if not a or not b or a[0] != b[0]:
        return False
    if a[:-1] == b[:-1] or len(a) == len(b) >= 4 and a[2:] == b[2:]:
        return True
    return loose and math.prod(a[:-1]) == math.prod(b[:-1])


def _query_sources(region: Region, ctx: MatchContext) -> list[fx.Node]:
    """What the weighted ops on an attention's query path read, nearest first, while they belong
    to the attention's module: MViT pools the queries with a conv after the qkv linear, LowFormer
    attends at a strided conv's resolution; the tokens the module itself reads come last."""
    info = node_info(region.anchor).attention
    node = ctx.by_name.get(info.query) if info is not None else None
    sources: list[fx.Node] = []
    for _ in range(64):
        if node is None:
            break
        inputs = data_inputs(node)
        if node_info(node).op_kind in _WEIGHTED:
            if sources and not in_scope(node, region.scope):
                break
            x = layer_input(node)  # x of x @ W, also where W is computed (a packed in_proj's slice)
            inputs = [x] if x is not None else inputs
            if inputs:
                sources.append(inputs[0])
        node = inputs[0] if inputs else None
    return sources


# what lies between a sub-layer's output and the residual add it joins: layer scale, drop path,
# and the layout moves of windowed attention (Hiera's mask units, SAM2's windows)
_TO_RESIDUAL = ("identity", "dropout", "cast", "mul", "div", "reshape", "permute", "getitem", "pad")


def _residual_join(output: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(the shortcut, the branch operand) of the residual add an output reaches: the residual stream
    at the output's resolution, where an attention that pools its queries (Hiera) reads more tokens
    than it writes."""
    node = output
    for _ in range(16):
        users = [u for u in node.users if node_info(u).op_kind != "shape"]
        if len(users) != 1:
            return None
        user = users[0]
        if node_info(user).op_kind == "add":
            others = [n for n in data_inputs(user) if n is not node]
            return (others[0], node) if len(others) == 1 else None
        if node_info(user).op_kind not in _TO_RESIDUAL:
            return None
        node = user
    return None


def parallel_input(region: Region, ctx: MatchContext) -> tuple[fx.Node, fx.Node]:
    """(what a parallel tuner reads, where it adds): the region input with the output's tokens. An
    attention whose queries are fewer than its keys (class attention, LeViT's subsampling attention)
    or whose keys are fewer (Twins' and PVT's spatial reduction) answers per query, so the tuner then
    reads the tokens the query projections read; else it moves to the residual add the output joins
    (x + OP(x) + U(x)) and reads the shortcut; a layout change of the same tokens is the last resort."""
    pairs = [(source, region.output) for source in (*region.inputs, *_query_sources(region, ctx))]
    join = _residual_join(region.output)
    if join is not None:
        pairs.append(join)
    first = _first_weighted(region, ctx)
    channels_first = first is not None and node_info(first).op_kind == "conv"
    for loose in (False, True):
        for reads, writes in pairs:
            if _fits(reads, writes, loose, channels_first and writes is region.output):
                return reads, writes
    # a feature map that is downsampled by whole factors (a strided attention, HaloNet's): the input
    # with the output's batch axis and rank, whichever order the region lists its inputs in
    out = node_info(region.output).shape
    same_layout = [
        i for i in region.inputs if (s := node_info(i).shape) and out and len(s) == len(out) and s[0] == out[0]
    ]
    return (same_layout or list(region.inputs))[0], region.output


def functional_conv_geometry(op: fx.Node, gm: fx.GraphModule) -> ConvGeometry | None:
    """The geometry of F.conv2d / aten.conv2d(x, weight, bias, stride, padding, dilation, groups)."""
    if "transpose" in node_info(op).op_name:  # its arguments come in another order; nn.ConvTranspose serves
        return None
    arguments = conv_arguments(op)
    weight = arguments.get("weight")
    if not isinstance(weight, fx.Node):
        return None
    shape = operator.attrgetter(str(weight.target))(gm).shape if weight.op == "get_attr" else node_info(weight).shape
    if not shape:
        return None
    dims = len(shape) - 2

    def spread(value, default):
        value = default if value is None else value
        value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        return value * dims if len(value) == 1 else value

    padding = arguments.get("padding")
    return ConvGeometry(
        tuple(shape[2:]),
        spread(arguments.get("stride"), 1),
        padding if isinstance(padding, str) else spread(padding, 0),
        spread(arguments.get("dilation"), 1),
        groups=arguments.get("groups") or 1,
    )


def _lora_site(found: RuleMatch, region: Region, ctx: MatchContext) -> tuple[Site, fx.Node, fx.Node]:
    weighted = [n for n in region.nodes if node_info(n).op_kind in (*_WEIGHTED, "embedding")]
    if len(weighted) != 1:
        raise fail(
            found,
            region,
            f"{found.rule.tuner} reparameterises one linear, conv or embedding; the region holds "
            f"{len(weighted)}; match single layers (e.g. {{node: {{kind: linear}}}})",
        )
    op = weighted[0]
    x = layer_input(op)
    module = ctx.node_ctx.modules.get(str(op.target)) if op.op == "call_module" else None
    channels = layer_channels(op, ctx)
    kind = node_info(op).op_kind
    geometry = None
    left = left_product_input(op) if x is None else None
    if left is not None:  # W @ x over [B, in, L]: LoRA as a 1x1 Conv1d pair
        x, kind, geometry = left, "conv", ConvGeometry((1,), (1,), (0,), (1,))
    if x is None:
        raise fail(found, region, f"cannot find what {op.name} reads; LoRA needs x of x @ W or an embedding's ids")
    if channels is None:
        raise fail(found, region, f"cannot find the weight of {op.name}")
    if kind == "embedding":
        geometry = embedding_table(op, ctx)
        if isinstance(geometry, str):
            raise fail(found, region, geometry)
    if kind == "conv" and geometry is None:
        geometry = (
            ConvGeometry(
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                groups=module.groups,
                transposed=module.transposed,
                output_padding=module.output_padding,
            )
            if isinstance(module, nn.modules.conv._ConvNd)
            else functional_conv_geometry(op, ctx.gm)
        )
        if geometry is None:
            raise fail(
                found,
                region,
                f"cannot read the kernel, stride, padding and groups of {op.name}; "
                "LoRA needs an nn.Conv module or a conv call with a parameter weight",
            )
    channels_in, channels_out = channels
    rank = len(node_info(op).shape or ())
    return Site(channels_in, channels_out, rank, kind == "conv", geometry), x, op


def region_site(found: RuleMatch, region: Region, ctx: MatchContext) -> tuple[Site, tuple, fx.Node, bool]:
    """Where a tuner of the rule's position goes in one region: (its site, what it reads, the node it
    adds to, whether its output takes the written node's view); a one-line UtuneError if it cannot.
    The dry run (plan.py) calls it too, so ``match`` refuses what ``rewrite`` would."""
    rule = found.rule
    if rule.position == "reparameterised":
        site, reads, writes = _lora_site(found, region, ctx)
        return site, (reads,), writes, False
    if rule.position == "prefix":
        call = attention_call(found, region, region.anchor, ctx)
        reads = (call.query, call.scale) if rule.config.parallel else (*call.reads, call.scale)
        return attention_site(found, region, call), reads, call.node, False
    if not region.inputs and rule.position == "parallel":
        raise fail(found, region, "the region reads no tensor (a model input or a constant); pick an operation")
    reads, writes = (region.output, region.output) if rule.position == "sequential" else parallel_input(region, ctx)
    site, reshape = _site(found, region, ctx, reads, writes)
    return site, (reads,), writes, reshape


def placement(region: Region, ctx: MatchContext, dtype_of: fx.Node) -> dict:
    parameters = [p for n in region.nodes for p in parameters_of(n, ctx).values()]
    device = parameters[0].device if parameters else next(ctx.gm.parameters(), torch.empty(0)).device
    dtype = getattr(torch, node_info(dtype_of).dtype or "float32")
    return {"device": device, "dtype": dtype if dtype.is_floating_point else torch.float32}


def _existing(region: Region, ctx: MatchContext, which: str) -> dict[str, nn.Parameter]:
    named = {name: p for n in region.nodes for name, p in parameters_of(n, ctx).items()}
    return {k: p for k, p in named.items() if which == "all" or k.endswith("bias")}


def head_layer(found: RuleMatch, region: Region, ctx: MatchContext) -> nn.Linear:
    """The classifier a head rule re-sizes (the dry run checks it too)."""
    op = region.anchor
    module = ctx.node_ctx.modules.get(str(op.target)) if op.op == "call_module" else None
    if not isinstance(module, nn.Linear):
        raise fail(found, region, "re-sizing needs the classifier to be an nn.Linear module")
    return module


def _resize_head(gm: fx.GraphModule, found: RuleMatch, region: Region, ctx: MatchContext, classes: int) -> dict:
    op, module = region.anchor, head_layer(found, region, ctx)
    new = start_fresh_head(nn.Linear(module.in_features, classes, bias=module.bias is not None)).to(
        module.weight.device, module.weight.dtype
    )
    parent, _, name = str(op.target).rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, new)
    ctx.node_ctx.modules[str(op.target)] = new
    return {f"{op.target}.{k}": p for k, p in new.named_parameters()}


def trained_by_rule(gm: fx.GraphModule, found: RuleMatch, ctx: MatchContext) -> dict[str, nn.Parameter]:
    """Parameters the rule's 'train' key selects (only reads the model: the dry run calls it too)."""
    chosen: dict[str, nn.Parameter] = {}
    for item in found.rule.train:
        if item in ("biases", "all"):
            for region in found.regions:
                chosen.update(_existing(region, ctx, item))
            continue
        matched = {k: p for k, p in gm.named_parameters() if fnmatch.fnmatchcase(k, item)}
        if not matched:
            raise UtuneError(
                f"rule '{found.rule.name}' ({found.rule.where}): train pattern '{item}' names no "
                "parameter; use 'biases', 'all' or a parameter-name glob such as 'head.*'"
            )
        chosen.update(matched)
    return chosen


def _refuse_tuner_on_tuner(found: RuleMatch, region: Region) -> None:
    earlier = next((n for n in region.nodes if TUNER_META in n.meta), None)
    if earlier is not None:
        raise fail(
            found,
            region,
            f"the region holds tuner nodes of rule '{earlier.meta[TUNER_META]['rule']}'; "
            "a tuner on another tuner is refused",
        )


def apply_rule(gm: fx.GraphModule, found: RuleMatch, ctx: MatchContext) -> tuple[int, int]:
    """Rewrite one rule's regions; returns (parameters added, existing parameters trained)."""
    rule = found.rule
    entry = TUNERS[rule.tuner]
    safe = tuner_module_name(rule.name)  # the name load_rules keeps distinct
    added, trained, regions = 0, {}, found.regions
    for region in regions:
        _refuse_tuner_on_tuner(found, region)
    if rule.position == "prompt" and regions:  # one pass over all blocks: shallow prompts travel block to block
        tag = {"rule": rule.name, "tuner": rule.tuner, "position": rule.position, "index": 0}
        added = insert_prompts(gm, found, ctx, safe, placement(regions[0], ctx, regions[0].output), tag)
        regions = ()
    if rule.position == "bypass" and regions:  # one ladder over all stems
        from utune_fx.rewrite.bypass import insert_bypass  # here: bypass.py builds on this module's sites

        added, regions = insert_bypass(gm, found, ctx, safe), ()
    for index, region in enumerate(regions):
        if rule.position == "none":
            classes = getattr(rule.config, "num_classes", None)
            if classes:
                new = _resize_head(gm, found, region, ctx, classes)
                added += sum(p.numel() for p in new.values())
                trained.update(new)
            else:
                trained.update(_existing(region, ctx, "bias" if rule.tuner == "bitfit" else "all"))
            continue
        site, reads, writes, reshape = region_site(found, region, ctx)
        module = entry.module(rule.config, site).to(**placement(region, ctx, writes))
        tag = {"rule": rule.name, "tuner": rule.tuner, "position": rule.position, "index": index}
        insert_tuner(gm, f"utune.{safe}.{index}", module, reads, writes, tag, reshape)
        added += sum(p.numel() for p in module.parameters())
    trained.update(trained_by_rule(gm, found, ctx))
    for parameter in trained.values():
        parameter.requires_grad_(True)
    return added, sum(p.numel() for p in {id(p): p for p in trained.values()}.values())
