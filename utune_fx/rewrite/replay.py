"""Replay a stretch of the frozen graph on other tokens (the prompts).

    frozen:   %n = layer_norm(%x); %qkv = linear(%n); %k = getitem(unbind(permute(reshape(%qkv, B, N, ..))), 1)
    replay({%x: %p}, [%k]) adds, after the chosen node:
              %n' = layer_norm(%p); %qkv' = linear(%n'); %k' = getitem(unbind(permute(reshape(%qkv', B', P, ..))), 1)

The copied nodes are those that depend on the replaced inputs and lead to the
targets, in graph order; the shape reads among them (``x.shape``) are copied
too, so reshapes follow the new token count. Everything else (weights, biases,
rotary tables) is shared with the frozen graph. Two kinds of node are not
copied but mapped:

* a ``cat`` over the token axis of slices of one tensor, where a model treats
  its class token apart from the patch tokens (EVA applies rotary embeddings
  to the patch tokens only): the prompts take that tensor unchanged, with no
  positional transform, like class tokens;
* nodes a caller handles itself (``handlers``: the attention of a replayed block;
  ``skip``: the inner nodes a handler stands for, such as a written-out softmax);
* with ``layout_free``, ops that only move tokens around without touching their
  channels (Swin's window partition and reverse, cyclic shifts, crops, the
  [B, H, W, C] <-> [B, H*W, C] views) are skipped: tokens outside the image grid
  (prompts) keep their place. An op that folds k neighbouring tokens into k times
  the channels (patch merging) repeats the prompts' channels k times, as VPT does.
  ``layout_free`` is the set of nodes this applies to (outside attention cores,
  where reshapes split heads).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

from torch import fx

from utune_fx.trace import node_info

Handler = Callable[[fx.Graph, dict], fx.Node]


def closure(sources: list[fx.Node], targets: list[fx.Node]) -> list[fx.Node]:
    """Nodes downstream of ``sources`` and upstream of (or equal to) ``targets``, in graph order."""
    upstream: set[fx.Node] = set()
    stack = list(targets)
    while stack:
        node = stack.pop()
        if node not in upstream:
            upstream.add(node)
            stack.extend(node.all_input_nodes)
    downstream: set[fx.Node] = set()
    stack = [user for source in sources for user in source.users if user in upstream]
    while stack:
        node = stack.pop()
        if node not in downstream and node not in sources:
            downstream.add(node)
            stack.extend(user for user in node.users if user in upstream)
    graph = targets[0].graph
    return [n for n in graph.nodes if n in downstream]


def _token_slice_source(node: fx.Node, members: set[fx.Node]) -> fx.Node | None:
    """The tensor a chain of per-token ops slices along its token axis, if any."""
    for _ in range(16):
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
            index, shape = node.args[1], node_info(node.args[0]).shape if isinstance(node.args[0], fx.Node) else None
            if shape and len(index) == len(shape) and _slices_token_axis(index, len(shape)):
                return node.args[0]
        inside = [n for n in node.all_input_nodes if n in members]
        if not inside:
            return None
        node = inside[0]
    return None


def _slices_token_axis(index: tuple, rank: int) -> bool:
    token_axis = rank - 2
    others_full = all(isinstance(i, slice) and i == slice(None) for k, i in enumerate(index) if k != token_axis)
    return others_full and isinstance(index[token_axis], slice) and index[token_axis] != slice(None)


def _positional_split(node: fx.Node, members: set[fx.Node]) -> fx.Node | None:
    """For a cat that rejoins token-axis slices of one tensor, that tensor."""
    if node_info(node).op_kind != "cat" or not node.args or not isinstance(node.args[0], (list, tuple)):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = len(node_info(node).shape or ())
    if not rank or dim % rank != rank - 2:
        return None
    sources = {
        _token_slice_source(part, members | {part}) if isinstance(part, fx.Node) else None for part in node.args[0]
    }
    return sources.pop() if len(sources) == 1 and None not in sources else None


_TOKEN_MOVES = ("reshape", "permute", "pad", "getitem", "other")  # kinds that may only move tokens


def repeat_channels(tokens, times: int):
    """Prompts through patch merging: k copies side by side (the 2x2 neighbours of a prompt are itself)."""
    return tokens.repeat(*[1] * (tokens.dim() - 1), times)


def _layout_move(node: fx.Node) -> int | None:
    """For an op that only rearranges tokens: how many times its channels grow (1: not at all)."""
    inputs = [n for n in node.all_input_nodes if node_info(n).shape]
    shape = node_info(node).shape
    source = node_info(inputs[0]).shape if len(inputs) == 1 else None
    if node_info(node).op_kind not in _TOKEN_MOVES or not shape or not source:
        return None
    if shape[-1] == source[-1]:
        return 1
    grows, rest = divmod(shape[-1], source[-1])
    return grows if not rest and grows > 1 and math.prod(shape) == math.prod(source) else None


def replay(
    env: dict[fx.Node, fx.Node],
    targets: list[fx.Node],
    after: fx.Node,
    handlers: dict[fx.Node, Handler] | None = None,
    layout_free: set[fx.Node] | frozenset = frozenset(),
    skip: set[fx.Node] | frozenset = frozenset(),
) -> tuple[dict[fx.Node, fx.Node], fx.Node]:
    """Copy the nodes from ``env``'s keys to ``targets`` reading ``env``'s values, inserted after
    ``after`` (handlers insert theirs at the same point). Returns the extended env and the
    last node inserted."""
    handlers = handlers or {}
    env = dict(env)
    nodes = [n for n in closure(list(env), targets) if n not in env]
    members = set(nodes)
    graph = targets[0].graph
    anchor = after.next  # inserting before one fixed node keeps the copies in order
    created: list[fx.Node] = []
    for node in nodes:
        if node in skip:
            continue
        source = _positional_split(node, members)
        if source is not None and source in env:
            env[node] = env[source]
            continue
        grows = _layout_move(node) if node in layout_free else None
        data = [n for n in node.all_input_nodes if n in env and node_info(n).shape]
        if grows == 1 and data:
            env[node] = env[data[0]]
            continue
        with graph.inserting_before(anchor):
            if grows and data:
                env[node] = graph.call_function(repeat_channels, (env[data[0]], grows))
            elif node in handlers:
                env[node] = handlers[node](graph, env)
            else:
                env[node] = graph.node_copy(node, lambda arg: env.get(arg, arg))
                env[node].meta = {k: v for k, v in node.meta.items() if k != "val"}
        created.append(env[node])
    kept = {env[t] for t in targets}
    for node in reversed(created):  # copies a mapped cat made useless (EVA's rotary branch)
        if not node.users and node not in kept:
            graph.erase_node(node)
            env = {k: v for k, v in env.items() if v is not node}
    return env, anchor.prev
