"""Tuners that join an attention: the prefix (both forms) and prompts (VPT).

    parallel prefix:  %a = attention(%q, %k, %v)
                      %u = call_module[utune.<rule>.<i>](%q);  %a2 = add(%a, %u)
    concat prefix:    %u = call_module[utune.<rule>.<i>](%q, %k, %v, %a, %mask_or_logits);  %a2 = add(%a, %u)
    prompt (deep):    %p = call_module[utune.<rule>.<i>]()                      # P_l as [1, P, C]
                      %k_p, %v_p = the block's norm and k/v projections replayed on %p
                      %u = call_module[utune.<rule>.<i>.attention<j>](%q, %k, %v, %a, %extra, %k_p, %v_p)
                      %a2 = add(%a, %u)
    prompt (shallow): %p = call_module[utune.<rule>.0](%x_0)                   # [B, P, C]
                      as deep, with %p carried through each selected block by
                      replaying the block on it (its attention over [K; K_p], [V; V_p];
                      token moves such as Swin's windows skipped, see replay.py)

Every inserted node carries ``meta['utune_tuner']``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

from utune_fx.errors import UtuneError
from utune_fx.match import MatchContext, Region, RuleMatch
from utune_fx.match.predicates import data_inputs
from utune_fx.rewrite.replay import closure, replay
from utune_fx.trace import node_info, trace_report
from utune_fx.trace.annotate import META_KEY
from utune_fx.trace.opkinds import matmul_operands, op_name
from utune_fx.tuners import AttentionForm, Site
from utune_fx.tuners.prefix import GatedConcatAttention
from utune_fx.tuners.prompts import PromptTokens

TUNER_META = "utune_tuner"
# ops that keep each token's values to itself, between a projection and the keys it makes
_PER_TOKEN = ("getitem", "split", "permute", "reshape", "identity", "norm", "cast", "dropout", "cat", "mul", "div")
_LAYOUT = ("getitem", "permute", "reshape", "identity", "pad", "dropout", "cast")


def fail(found: RuleMatch, region: Region, message: str) -> UtuneError:
    return UtuneError(f"rule '{found.rule.name}' ({found.rule.where}), region {region.scope or 'model'}: {message}")


@dataclass(frozen=True)
class AttentionCall:
    node: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    extra: fx.Node | None  # sdpa's mask, or the softmax input of a written-out attention
    form: AttentionForm
    scale: fx.Node | None = None  # a scale factor the graph computes (times form.scale)
    parts: tuple[fx.Node, ...] = ()  # a written-out attention's inner nodes (QK^T, softmax, ...)

    @property
    def reads(self) -> tuple:
        return self.query, self.key, self.value, self.node, self.extra


def attention_call(found: RuleMatch, region: Region, node: fx.Node, ctx: MatchContext) -> AttentionCall:
    info = node_info(node).attention
    if node_info(node).op_kind != "attention" or node.op == "call_module" or info is None:
        raise fail(
            found,
            region,
            f"{found.rule.tuner} needs an attention whose queries, keys and values are "
            "visible in the graph (scaled_dot_product_attention or softmax(QK^T)V), not a "
            "module such as nn.MultiheadAttention",
        )
    by_name = ctx.by_name
    parts = tuple(by_name[name] for name in info.parts if name in by_name)
    query, key, value = (by_name[name] for name in (info.query, info.key, info.value))
    if op_name(node) == "scaled_dot_product_attention":  # F.sdpa (fx) or aten.sdpa (torch.export)
        argument = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"), node.args))
        argument.update(node.kwargs)
        scale, causal = argument.get("scale"), argument.get("is_causal", False)
        if isinstance(scale, fx.Node) or isinstance(causal, fx.Node):
            raise fail(found, region, f"{node.name}: scale and is_causal must be constants in the traced graph")
        mask = argument.get("attn_mask")
        return AttentionCall(node, query, key, value, mask, AttentionForm("sdpa", scale, bool(causal)), parts=parts)
    return _written_out_call(found, region, node, parts)


def _written_out_call(found: RuleMatch, region: Region, node: fx.Node, parts: tuple[fx.Node, ...]) -> AttentionCall:
    """softmax(s * Q K^T + bias) V: the tensors as its matmuls read them, and the constant s."""
    softmax = next((p for p in parts if node_info(p).op_kind == "softmax"), None)
    scores = next((p for p in parts if node_info(p).op_kind == "matmul"), None)
    operands = matmul_operands(scores) if scores is not None else []
    if softmax is None or len(operands) != 2 or op_name(node) not in ("matmul", "bmm"):
        raise fail(
            found,
            region,
            f"{node.name}: {found.rule.tuner} needs attention written as softmax(QK^T)V with both matmuls in the graph",
        )
    query, transposed = operands
    logits = data_inputs(softmax)[0]
    scale, scale_node, step = 1.0, None, logits
    while step is not scores and isinstance(step, fx.Node):  # factors between QK^T and the softmax
        on_path = next((a for a in data_inputs(step) if a is scores or scores in _ancestors(a)), None)
        others = [a for a in step.args if a is not on_path]
        kind = node_info(step).op_kind
        if kind in ("mul", "div") and len(others) == 1:
            factor = others[0]
            if isinstance(factor, (int, float)) and not isinstance(factor, bool):
                scale = scale * factor if kind == "mul" else scale / factor
            elif isinstance(factor, fx.Node) and kind == "mul" and scale_node is None and not node_info(factor).shape:
                scale_node = factor  # a scale computed from shapes, e.g. 1 / sqrt(k.size(-1))
            else:
                raise fail(found, region, f"{step.name}: cannot read the attention's scale from {factor}")
        step = on_path
    return AttentionCall(
        node,
        query,
        _untransposed(transposed),
        matmul_operands(node)[1],
        logits,
        AttentionForm("logits", scale),
        scale_node,
        parts,
    )


def _ancestors(node: fx.Node, limit: int = 16) -> set[fx.Node]:
    seen, frontier = set(), [node]
    for _ in range(limit):
        frontier = [i for n in frontier for i in n.all_input_nodes if i not in seen]
        seen.update(frontier)
    return seen


def _untransposed(node: fx.Node) -> fx.Node:
    """K for a matmul operand K^T: the transpose's input, or a new transpose."""
    rank = len(node_info(node).shape or ())
    if op_name(node) == "transpose" and rank and {d % rank for d in node.args[1:3]} == {rank - 2, rank - 1}:
        return node.args[0]
    with node.graph.inserting_after(node):
        key = node.graph.call_method("transpose", (node, -2, -1))
    key.meta[META_KEY] = replace(node_info(node), shape=None, attention=None, part_of=None)
    return key


def attention_site(found: RuleMatch, region: Region, call: AttentionCall) -> Site:
    q_shape, out_shape = node_info(call.query).shape, node_info(call.node).shape
    if not q_shape or not out_shape or len(q_shape) < 3 or tuple(out_shape[:-1]) != tuple(q_shape[:-1]):
        raise fail(
            found,
            region,
            f"queries {q_shape} and attention output {out_shape} do not line up as [batch, heads..., tokens, width]",
        )
    return Site(q_shape[-1], out_shape[-1], len(q_shape), False, heads=tuple(q_shape[1:-2]), attention=call.form)


def tag_new_nodes(graph: fx.Graph, before: set[fx.Node], tag: dict) -> None:
    """Mark nodes a tuner added; shapes of replayed nodes are those of the prompts, so drop them."""
    for node in graph.nodes:
        if node not in before:
            node.meta[TUNER_META] = tag
            if META_KEY in node.meta:
                node.meta[META_KEY] = replace(node.meta[META_KEY], shape=None, attention=None, part_of=None)


def add_update(
    gm: fx.GraphModule, path: str, module: nn.Module, args: tuple, writes: fx.Node, after: fx.Node | None = None
) -> fx.Node:
    """%u = call_module[path](*args); users of ``writes`` read writes + %u."""
    gm.add_submodule(path, module)
    with gm.graph.inserting_after(after or writes):
        call = gm.graph.call_module(path, args)
    with gm.graph.inserting_after(call):
        total = gm.graph.call_function(operator.add, (writes, call))
    # annotated (an add), so the rules that follow can read the graph around it
    total.meta[META_KEY] = replace(node_info(writes), op_kind="add", op_name="add", attention=None, part_of=None)
    writes.replace_all_uses_with(total, delete_user_cb=lambda user: user not in (call, total))
    return total


def _fixed_token_count(found: RuleMatch, region: Region, projection: fx.Node, tensor: fx.Node) -> None:
    """Prompts add tokens, so the replayed path from a projection to its keys must not fix the token
    count: torch.export specialises every size but the batch and a token input's sequence axis to the
    example inputs (fx keeps them symbolic), e.g. nn.MultiheadAttention's ``view(k, [6, B * heads, 8])``
    for 6 tokens; and a dynamic sequence axis is read off the input ids, not off the replayed tokens."""
    gm = tensor.graph.owning_module
    tokens = (node_info(tensor).shape or ())[-2:-1]
    try:
        if not tokens or gm is None or trace_report(gm).frontend != "export":
            return
    except KeyError:  # a graph utune_fx.trace did not make: its front end is unknown
        return
    replayed = closure([projection], [tensor])
    for node in replayed:
        if node_info(node).op_kind != "reshape":
            continue
        leaves = pytree.tree_leaves(node.args[1:])
        if tokens[0] in [leaf for leaf in leaves if isinstance(leaf, int)]:
            raise fail(
                found,
                region,
                f"{node.name} fixes the token count at {tokens[0]} (torch.export specialises sizes to the "
                "example inputs); prompts add tokens, so they need a graph traced by torch.fx",
            )
        # a dynamic sequence axis: the size is read off the model's inputs, not off the tokens replayed
        outside = [leaf for leaf in leaves if isinstance(leaf, fx.Node) and leaf not in replayed]
        if any(_traced_int(leaf) == tokens[0] for leaf in outside):
            raise fail(
                found,
                region,
                f"{node.name} takes the token count from the model's inputs, not from the tokens it reshapes "
                "(torch.export's dynamic sequence axis); prompts add tokens, so they need a graph traced by torch.fx",
            )


def _traced_int(node: fx.Node) -> int | None:
    """The value a symbolic size (``sym_size(input_ids, 1)``) had on the example inputs."""
    hint = getattr(getattr(node.meta.get("val"), "node", None), "hint", None)
    return int(hint) if isinstance(hint, int) else None


def _projection(found: RuleMatch, region: Region, tensor: fx.Node) -> fx.Node:
    """The linear that makes ``tensor`` (queries, keys or values) through per-token ops."""
    node = tensor
    for _ in range(24):
        kind = node_info(node).op_kind
        if kind == "linear":
            _fixed_token_count(found, region, node, tensor)
            return node
        if kind not in _PER_TOKEN or not data_inputs(node):
            break
        node = data_inputs(node)[0]
    raise fail(
        found,
        region,
        f"cannot follow {tensor.name} back to the linear projection that makes it; prompts "
        "need the attention's keys and values to come from a linear layer",
    )


def _output_projection(attention: fx.Node) -> fx.Node | None:
    """The linear that reads the attention's output (after merging heads), if any."""
    node = attention
    for _ in range(8):
        users = [u for u in node.users if TUNER_META not in u.meta]
        if len(users) != 1:
            return None
        node = users[0]
        if node_info(node).op_kind == "linear":
            return node
        if node_info(node).op_kind not in _PER_TOKEN:
            return None
    return None


def _attention_cores(found: RuleMatch, region: Region, calls: list[AttentionCall]) -> set[fx.Node]:
    """Nodes between the q/k/v projections and the output projection, where reshapes split heads."""
    core: set[fx.Node] = set()
    for call in calls:
        core |= set(closure([_projection(found, region, t) for t in (call.query, call.key, call.value)], [call.node]))
        out = _output_projection(call.node)
        core |= {call.node} | (set(closure([call.node], [out])) - {out} if out is not None else set())
    return core


def _norm_before(node: fx.Node) -> fx.Node | None:
    """The norm whose output reaches ``node`` through layout ops only (pre-norm blocks), if any."""
    for _ in range(24):
        kind = node_info(node).op_kind
        if kind == "norm":
            return node
        if kind not in _LAYOUT or not data_inputs(node):
            return None
        node = data_inputs(node)[0]
    return None


def _attentions(found: RuleMatch, region: Region, ctx: MatchContext) -> list[AttentionCall]:
    nodes = sorted((n for n in region.nodes if node_info(n).op_kind == "attention"), key=ctx.order.__getitem__)
    if not nodes:
        raise fail(
            found,
            region,
            "prompts join the attention of a block; this region holds no attention (match transformer_block)",
        )
    return [attention_call(found, region, n, ctx) for n in nodes]


def _stream_input(found: RuleMatch, region: Region) -> fx.Node:
    """The block input that carries its tokens ([B, N, C], or Swin's [B, H, W, C])."""
    shape = node_info(region.output).shape
    for node in region.inputs:
        entry = node_info(node).shape
        if shape and entry and len(entry) >= 3 and entry[-1] == shape[-1] and entry[0] == shape[0]:
            return node
    raise fail(
        found,
        region,
        f"shallow prompts travel with the tokens through blocks that read and write tokens "
        f"[batch, ..., channels]; this block writes {shape}: use deep prompts (vpt_deep.yaml)",
    )


def deep_prompt_stream(found: RuleMatch, region: Region, calls: list[AttentionCall]) -> fx.Node:
    """The one token stream a block's keys and values are made from, which deep prompts replace."""
    sources = {data_inputs(_projection(found, region, t))[0] for c in calls for t in (c.key, c.value)}
    if len(sources) != 1:
        raise fail(
            found,
            region,
            "the keys and values of this block's attentions read different "
            "inputs; deep prompts need one token stream per block",
        )
    return sources.pop()


def _prompt_attention(query, key, value, prompt_keys, prompt_values, scale=None):
    """The prompts' own queries over the real and the prompt keys (shallow prompts move on).
    With windowed attention (keys [B * windows, ...]) the prompts join every window and
    their outputs are averaged over the windows, as in VPT's Swin variant."""
    windows = key.shape[0] // query.shape[0]
    query, prompt_keys, prompt_values = (
        t.repeat_interleave(windows, dim=0) for t in (query, prompt_keys, prompt_values)
    )
    out = F.scaled_dot_product_attention(
        query, torch.cat([key, prompt_keys], -2), torch.cat([value, prompt_values], -2), scale=scale
    )
    return out.unflatten(0, (-1, windows)).mean(dim=1)


def _handler(call: AttentionCall):
    def handle(graph: fx.Graph, env: dict) -> fx.Node:
        args = (env[call.query], call.key, call.value, env[call.key], env[call.value])
        scale = call.form.scale
        if call.scale is not None:  # a factor the graph computes, e.g. 1 / sqrt(k.size(-1))
            scale = graph.call_function(operator.mul, (call.scale, 1.0 if scale is None else scale))
        return graph.call_function(_prompt_attention, args, {"scale": scale})

    return handle


def insert_prompts(
    gm: fx.GraphModule, found: RuleMatch, ctx: MatchContext, safe: str, placement: dict, tag: dict
) -> int:
    """VPT prompts on every selected block; returns the parameters added."""
    config, before = found.rule.config, set(gm.graph.nodes)
    everywhere = frozenset(before)
    regions = sorted(found.regions, key=lambda r: ctx.order[r.output])
    stream: fx.Node | None = None  # shallow: the prompts' tokens, as of ``stream_source``
    stream_source: fx.Node | None = None
    added = 0
    for index, region in enumerate(regions):
        calls = _attentions(found, region, ctx)
        if config.deep:
            tokens_at = deep_prompt_stream(found, region, calls)
            norm = _norm_before(tokens_at)
            width = node_info(tokens_at).shape[-1]
            module = PromptTokens(config, Site(width, width, 3, False)).to(**placement)
            gm.add_submodule(f"utune.{safe}.{index}", module)
            with gm.graph.inserting_before(calls[0].node):
                prompts = gm.graph.call_module(f"utune.{safe}.{index}", ())
            if norm is not None:
                env, _ = replay({data_inputs(norm)[0]: prompts}, [norm], prompts)
                prompts = env[norm]
            env = {tokens_at: prompts}
        else:
            entry = _stream_input(found, region)
            if stream is None:
                width = node_info(entry).shape[-1]
                module = PromptTokens(config, Site(width, width, 3, False)).to(**placement)
                gm.add_submodule(f"utune.{safe}.{index}", module)
                with gm.graph.inserting_after(entry):
                    stream = gm.graph.call_module(f"utune.{safe}.{index}", (entry,))
                stream_source = entry
            elif stream_source is not entry:
                env, _ = replay({stream_source: stream}, [entry], entry.prev, layout_free=everywhere)
                stream = env[entry]
            env = {entry: stream}
        free = everywhere - _attention_cores(found, region, calls) if not config.deep else frozenset()
        for call in calls:
            env, _ = replay(env, [call.key, call.value], call.node.prev, layout_free=free)
        if not config.deep and index + 1 < len(regions):
            handlers = {call.node: _handler(call) for call in calls}
            inner = {part for call in calls for part in call.parts}  # the handlers stand for them
            env, _ = replay(env, [region.output], region.output, handlers, layout_free=free, skip=inner)
            stream, stream_source = env[region.output], region.output
        for j, call in enumerate(calls):
            site = attention_site(found, region, call)
            gate = GatedConcatAttention(site).to(**placement)
            args = (*call.reads, env[call.key], env[call.value], call.scale)
            add_update(gm, f"utune.{safe}.{index}.attention{j}", gate, args, call.node)
        added += sum(p.numel() for p in gm.get_submodule(f"utune.{safe}.{index}").parameters())
    tag_new_nodes(gm.graph, before, tag)
    return added
