"""What a tuner's size depends on, read off a matched region.

    Region(blocks.0.attn: qkv ... proj) -> RegionSize(channels_in=768, channels_out=768,
                                                      biases=3072, weights=2362368)
    Region(h.0.attn.c_attn: addmm(b, x, W), W [64, 192]) -> RegionSize(channels_in=64, channels_out=192, ...)
    Region(wte: embedding(ids), table [100, 64])        -> RegionSize(channels_in=100, channels_out=64, ...)

Channels come from the weights of the region's first and last linear/conv
(so token layouts [B, N, C] and feature maps [B, C, H, W] read alike); a linear
spelled as a matrix product (x @ W, addmm(b, x, W) with W [in, out] as in
transformers' Conv1D, or with W.t()) reads them off its tensors, whatever W's
layout; an embedding's table is [num_embeddings, dim]. The parameter counts
come from every parameter the region's nodes use.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn

from utune_fx.match.patterns import MatchContext
from utune_fx.match.predicates import data_inputs, is_weight
from utune_fx.match.structure import Region
from utune_fx.trace import node_info
from utune_fx.trace.opkinds import matmul_operands
from utune_fx.tuners import EmbeddingTable, RegionSize


def parameters_of(node: fx.Node, ctx: MatchContext) -> dict[str, torch.Tensor]:
    """Parameters a node uses: its module's, or the get_attr weights it reads."""
    if node.op == "call_module":
        module = ctx.node_ctx.modules[str(node.target)]
        return {f"{node.target}.{name}": p for name, p in module.named_parameters()}
    found = {}
    for arg in node.all_input_nodes:
        while arg.op != "get_attr" and node_info(arg).op_kind in ("permute", "reshape", "cast") and arg.all_input_nodes:
            arg = arg.all_input_nodes[0]
        if arg.op == "get_attr":
            value = ctx.gm.get_parameter(str(arg.target)) if _is_parameter(ctx.gm, str(arg.target)) else None
            if value is not None:
                found[str(arg.target)] = value
    return found


def _is_parameter(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


_CONV_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def conv_arguments(op: fx.Node) -> dict:
    """F.conv2d / aten.conv2d arguments by name (both take them in this order; normalising them
    through torch's schemas is ambiguous for F.conv2d, whose padding may be a string)."""
    return dict(zip(_CONV_ARGUMENTS, op.args)) | dict(op.kwargs)


# a linear spelled as a matrix product: its weight may be stored [in, out] or [out, in]
_MATRIX_PRODUCTS = ("matmul", "mm", "addmm")
_EMBEDDING_ARGUMENTS = ("input", "weight", "padding_idx", "max_norm")  # F.embedding
_ATEN_EMBEDDING_ARGUMENTS = ("weight", "input", "padding_idx")  # aten.embedding(weight, indices, padding_idx)


def embedding_arguments(op: fx.Node) -> dict:
    """F.embedding / aten.embedding arguments by name: input (the ids), weight, padding_idx (None when
    there is none; aten spells that -1) and max_norm."""
    aten = isinstance(op.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
    arguments = dict(zip(_ATEN_EMBEDDING_ARGUMENTS if aten else _EMBEDDING_ARGUMENTS, op.args)) | dict(op.kwargs)
    if "indices" in arguments:
        arguments["input"] = arguments.pop("indices")
    if aten and arguments.get("padding_idx") == -1:
        arguments["padding_idx"] = None
    return arguments


def embedding_table(op: fx.Node, ctx: MatchContext) -> EmbeddingTable | str:
    """What LoRA copies from an embedding lookup, or why it cannot tune it."""
    module = ctx.node_ctx.modules.get(str(op.target)) if op.op == "call_module" else None
    if isinstance(module, nn.EmbeddingBag) or "bag" in node_info(op).op_name:
        return "an embedding bag sums its lookups; LoRA tunes nn.Embedding, F.embedding and aten.embedding"
    arguments = (
        {"padding_idx": module.padding_idx, "max_norm": module.max_norm}
        if module is not None
        else embedding_arguments(op)
    )
    if arguments.get("max_norm") is not None:
        return "the embedding renormalises its rows in place (max_norm); LoRA needs a plain lookup"
    return EmbeddingTable(arguments.get("padding_idx"))


def layer_input(node: fx.Node) -> fx.Node | None:
    """The tensor a linear, conv or embedding reads: an embedding's ids, x of x @ W (None for W @ x),
    a linear's or conv's first argument (also a constant: ConViT's pos_proj(rel_indices), SigLIP's
    probe), else its first input that is not a weight."""
    info = node_info(node)
    if info.op_kind == "embedding":
        ids = node.args[0] if node.op == "call_module" and node.args else embedding_arguments(node).get("input")
        return ids if isinstance(ids, fx.Node) else None
    if info.op_kind == "linear" and node.op == "call_function" and info.op_name in _MATRIX_PRODUCTS:
        x, weight = matmul_operands(node)[:2]  # W @ x mixes another axis than the channels: no x here
        return x if isinstance(x, fx.Node) and not is_weight(x) and is_weight(weight) else None
    if info.op_kind in ("linear", "conv") and node.op in ("call_function", "call_module") and node.args:
        x = node.args[0]  # F.linear / aten conv / a module call: the input comes first, data or constant
        if isinstance(x, fx.Node):
            return x
    inputs = data_inputs(node) or [a for a in node.args[:1] if isinstance(a, fx.Node)]
    return inputs[0] if inputs else None


def left_product_input(node: fx.Node) -> fx.Node | None:
    """x of W @ x, a weight from the left over [B, in, L] (Mamba's dt_proj.weight @ t): its channels
    sit on axis 1, as a 1x1 Conv1d reads them. None for any other layer."""
    info = node_info(node)
    if info.op_kind != "linear" or node.op != "call_function" or info.op_name not in ("matmul", "mm"):
        return None
    weight, x = matmul_operands(node)[:2]
    if not (isinstance(x, fx.Node) and is_weight(weight) and not is_weight(x)):
        return None
    return x if len(node_info(x).shape or ()) == 3 and len(info.shape or ()) == 3 else None


def layer_channels(node: fx.Node, ctx: MatchContext) -> tuple[int, int] | None:
    """(in, out) channels of a linear / conv / attention / embedding from its weight; an embedding's
    are (num_embeddings, dim)."""
    module = ctx.node_ctx.modules.get(str(node.target)) if node.op == "call_module" else None
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, module.embed_dim
    left = left_product_input(node)
    if left is not None:  # W @ x over [B, in, L]
        return node_info(left).shape[1], node_info(node).shape[1]
    weight, groups = _weight_and_groups(node, ctx)
    if node_info(node).op_kind == "embedding":
        return tuple(weight.shape) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
    transposed = getattr(module, "transposed", False)  # nn.ConvTranspose: weight [in, out/groups, *kernel]
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        # a weight computed in the graph (NFNet's standardised convs, a slice of a packed weight): the tensors' widths
        inputs = data_inputs(node)
        shapes = node_info(inputs[0]).shape if inputs else None, node_info(node).shape
        if node_info(node).op_kind == "conv" and all(shapes) and min(map(len, shapes)) >= 3:
            return shapes[0][1], shapes[1][1]
        if node_info(node).op_kind == "linear" and all(shapes):  # a slice of a packed weight (in_proj_weight)
            return shapes[0][-1], shapes[1][-1]
        return None
    out_channels, in_channels = weight.shape[0], weight.shape[1] * groups
    if transposed:
        out_channels, in_channels = weight.shape[1] * groups, weight.shape[0]
    if (
        node_info(node).op_kind == "linear"
        and node.op == "call_function"
        and node_info(node).op_name in _MATRIX_PRODUCTS
    ):
        # x @ W, addmm(b, x, W) (W [in, out]: transformers' Conv1D) or with W.T (a linear decomposed,
        # BotNet's relative-position keys): read the widths off the tensors
        reads = layer_input(node)
        shapes = node_info(reads).shape if reads is not None else None, node_info(node).shape
        if all(shapes):
            return shapes[0][-1], shapes[1][-1]
        in_channels, out_channels = out_channels, in_channels
    return in_channels, out_channels


def _weight_and_groups(node: fx.Node, ctx: MatchContext) -> tuple[torch.Tensor | None, int]:
    """A layer's weight (a parameter, or a buffer: a blur filter) and its groups."""
    if node.op == "call_module":
        module = ctx.node_ctx.modules[str(node.target)]
        weight = getattr(module, "weight", None)
        return (weight if isinstance(weight, torch.Tensor) else None), getattr(module, "groups", 1)
    kind = node_info(node).op_kind
    arguments = conv_arguments(node) if kind == "conv" else embedding_arguments(node) if kind == "embedding" else {}
    weight = arguments.get("weight")
    if not isinstance(weight, fx.Node):
        weights = [n for n in node.all_input_nodes if n.op == "get_attr" and n is not node.args[0]]
        weight = weights[0] if weights else None
    value = (
        operator.attrgetter(str(weight.target))(ctx.gm)
        if isinstance(weight, fx.Node) and weight.op == "get_attr"
        else None
    )
    return (value if isinstance(value, torch.Tensor) else None), arguments.get("groups") or 1


def _attention_heads(node: fx.Node, ctx: MatchContext) -> int:
    info = node_info(node).attention
    query = ctx.by_name.get(info.query) if info is not None else None
    shape = node_info(query).shape if query is not None else None
    return math.prod(shape[1:-2]) if shape and len(shape) >= 3 else 0


_AXIS_1_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def normalises_axis_1(node: fx.Node, ctx: MatchContext) -> bool:
    """A norm of feature maps (BatchNorm, GroupNorm, InstanceNorm): their channels are axis 1."""
    if node_info(node).op_kind != "norm":
        return False
    if node.op == "call_module":
        return isinstance(ctx.node_ctx.modules.get(str(node.target)), _AXIS_1_NORMS)
    return getattr(node.target, "__name__", "") in ("batch_norm", "group_norm", "instance_norm")


def region_size(region: Region, ctx: MatchContext, position: int = 0) -> RegionSize:
    """What tuners' sizes depend on; ``position``: the region's place among its rule's regions."""
    ordered = sorted(region.nodes, key=ctx.order.__getitem__)
    # an embedding sets the widths only of a region without other layers (its in channels are the vocabulary)
    layers = [n for n in ordered if node_info(n).op_kind in ("linear", "conv", "attention")]
    layers = layers or [n for n in ordered if node_info(n).op_kind == "embedding"]
    weighted = [(n, io) for n in layers for io in [layer_channels(n, ctx)] if io is not None]
    parameters: dict[str, torch.Tensor] = {}
    for node in ordered:
        parameters.update(parameters_of(node, ctx))
    # no linear or conv: the channels the rewriter's site reads (axis 1 after a norm of feature maps)
    out_shape = node_info(region.output).shape
    axis = 1 if any(normalises_axis_1(n, ctx) for n in ordered) else -1
    fallback = out_shape[axis if len(out_shape) > 1 else -1] if out_shape else 0
    channels_in = weighted[0][1][0] if weighted else fallback
    channels_out = weighted[-1][1][1] if weighted else fallback
    single = weighted[0][0] if len(weighted) == 1 else None
    fan_in, groups = 0, 1
    if single is not None:
        weight, groups = _weight_and_groups(single, ctx)
        # weight elements per output channel: in/groups * kernel, for a transposed conv too
        fan_in = weight.numel() // weighted[0][1][1] if weight is not None and weight.dim() >= 2 else 0
    return RegionSize(
        channels_in=channels_in,
        channels_out=channels_out,
        fan_in=fan_in,
        groups=groups,
        biases=sum(p.numel() for name, p in parameters.items() if name.endswith("bias")),
        weights=sum(p.numel() for p in parameters.values()),
        heads=sum(_attention_heads(n, ctx) for n in ordered if node_info(n).op_kind == "attention"),
        position=position,
    )


# Region-relative bounds on tuner sizes (docs/limits.md, "Tuner settings and sizes"). A width (LoRA's
# rank, an adapter's hidden width, a prefix's reparameterisation) over WIDTH_FACTOR times the region's
# channels buys nothing: LoRA's update cannot gain rank past the weight's widths, and a bottleneck wider
# than the stream is none. The floor keeps the shipped settings (rank 8, hidden 8) on narrow layers
# (CaiT's talking-heads projections are 4 wide). Ranks between the weight's widths stay allowed, as in PEFT.
WIDTH_FACTOR, WIDTH_FLOOR = 4, 64
# Extra tokens (prefix, prompts) beyond TOKEN_FACTOR times the tokens the region reads drown them out.
TOKEN_FACTOR, TOKEN_FLOOR = 4, 256


def region_tokens(region: Region) -> int:
    """Tokens a region reads: every axis of its input but the batch and the channels (last axis)."""
    shape = region.in_shape or region.out_shape or ()
    return math.prod(shape[1:-1]) if len(shape) >= 3 else 1


def size_refusal(config: object, size: RegionSize, tokens: int) -> str | None:
    """Why a tuner's sizes are far above what the region it tunes can use, with the bound; or None.

    lora rank, adapters' hidden, prefix's reparam_hidden:
        <= max(WIDTH_FACTOR * channels, WIDTH_FLOOR), channels the larger width of the region (for LoRA
        the layer's fan-in, in channels x kernel, or its out channels); grouped convs cap LoRA's rank already
    prefix and prompt length:
        <= max(TOKEN_FACTOR * tokens, TOKEN_FLOOR)
    """
    fan_in = size.fan_in or size.channels_in
    widths = {
        "rank": (max(fan_in, size.channels_out), f"the layer's widths ({fan_in} in, {size.channels_out} out)"),
        "hidden": (max(size.channels_in, size.channels_out), "the region's channels"),
    }
    widths["reparam_hidden"] = widths["hidden"]
    for name, (channels, what) in widths.items():
        width = getattr(config, name, None)
        bound = max(WIDTH_FACTOR * channels, WIDTH_FLOOR)
        if isinstance(width, int) and width > bound and not (name == "rank" and size.groups > 1):
            return (
                f"{name} {width} is far above {what}: at most max({WIDTH_FACTOR} x {channels}, {WIDTH_FLOOR}) "
                f"= {bound}; lower {name}"
            )
    length, bound = getattr(config, "length", None), max(TOKEN_FACTOR * tokens, TOKEN_FLOOR)
    if isinstance(length, int) and length > bound:
        return (
            f"length {length} is far above the {tokens} token(s) the region reads: at most "
            f"max({TOKEN_FACTOR} x tokens, {TOKEN_FLOOR}) = {bound}; lower length"
        )
    return None
