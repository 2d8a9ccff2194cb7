"""Find attention spelled out as softmax(Q K^T) V and give it the ``attention`` kind.

Models that do not call ``F.scaled_dot_product_attention`` compute attention
by hand; the normaliser makes both look the same to rules:

    before:  m1 = matmul(q, transpose(k))        kind matmul
             s  = softmax(add(mul(m1, scale), bias))
             m2 = matmul(dropout(s), v)          kind matmul
    after:   m2                                  kind attention, attention={q, k, v, parts}
             m1, s                               keep their kinds, part_of = m2

The factorised form of CoaT, ``q @ (softmax(k)^T @ v)``, is attention too:
the outer matmul takes the kind, the inner one and the softmax are its parts.

Between the two matmuls and the softmax any short chain of scaling, masking,
bias, reshape, permute, dropout, head-mixing linear or activation ops may sit
(BEiT's relative position bias, Swin's window mask, CaiT's talking heads,
Gemma 2's soft-capping tanh, GPT-OSS's sink logits concatenated to the scores).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from utune_fx.trace.opkinds import matmul_operands

# Ops allowed between QK^T and softmax, and between softmax and (.)V.
_CHAIN_KINDS = frozenset(
    {
        "mul",
        "div",
        "add",
        "sub",
        "cast",
        "reshape",
        "permute",
        "dropout",
        "identity",
        "linear",
        "getitem",
        "other",
        "norm",
        "arith",
        "act",  # Gemma 2's logit soft-capping: cap * tanh(scores / cap)
        "cat",  # GPT-OSS's attention sinks: softmax(cat(scores, sinks))[..., :-1]
    }
)
_MAX_CHAIN = 8


@dataclass(frozen=True)
class AttentionInfo:
    """Where an attention node reads its inputs (node names in the same graph)."""

    query: str
    key: str
    value: str
    parts: tuple[str, ...] = ()  # nodes of a hand-written subgraph, output excluded


def _walk_back(start: object, target_kind: str, kinds: dict[fx.Node, str]) -> list[fx.Node] | None:
    """Path (start .. match) to the nearest node of ``target_kind``, through chain ops."""
    frontier: list[tuple[object, list[fx.Node]]] = [(start, [])]
    for _ in range(_MAX_CHAIN):
        next_frontier = []
        for node, path in frontier:
            if not isinstance(node, fx.Node):
                continue
            kind = kinds.get(node)
            if kind == target_kind:
                return path + [node]
            if kind in _CHAIN_KINDS:
                next_frontier.extend((arg, path + [node]) for arg in node.all_input_nodes)
        frontier = next_frontier
    return None


def _strip(node: object, kinds: dict[fx.Node, str]) -> object:
    """See through scaling and layout ops to the tensor a matmul really reads."""
    while isinstance(node, fx.Node) and kinds.get(node) in ("permute", "mul", "div", "cast", "reshape"):
        node = node.args[0]
    return node


def _factorised(node: fx.Node, operands: list, kinds: dict[fx.Node, str], taken: set) -> AttentionInfo | None:
    """Q (softmax(K)^T V): CoaT's factorised attention, softmax over keys first."""
    for context_index in (0, 1):
        to_context = _walk_back(operands[context_index], "matmul", kinds)
        if to_context is None or to_context[-1] is node or to_context[-1] in taken:
            continue
        context = to_context[-1]
        inner = matmul_operands(context)
        for probs_index in range(len(inner)):
            to_softmax = _walk_back(inner[probs_index], "softmax", kinds)
            if to_softmax is None or len(inner) != 2:
                continue
            query, key, value = operands[1 - context_index], to_softmax[-1].args[0], inner[1 - probs_index]
            if all(isinstance(n, fx.Node) for n in (query, key, value)):
                parts = tuple(dict.fromkeys(n.name for n in to_context + to_softmax))
                return AttentionInfo(query.name, key.name, value.name, parts)
    return None


def find_softmax_attention(graph: fx.Graph, kinds: dict[fx.Node, str]) -> dict[fx.Node, AttentionInfo]:
    """Output matmul of every softmax(QK^T)V subgraph (or its factorised form
    Q (softmax(K)^T V)), with its q, k, v."""
    found = _find_standard(graph, kinds)
    by_name = {node.name: node for node in graph.nodes}
    taken = set(found) | {by_name[name] for info in found.values() for name in info.parts}
    for node in graph.nodes:
        if kinds.get(node) != "matmul" or node in taken:
            continue
        operands = matmul_operands(node)
        info = _factorised(node, operands, kinds, taken) if len(operands) == 2 else None
        if info is not None:
            found[node] = info
            taken |= {node} | {by_name[name] for name in info.parts}
    return found


def _find_standard(graph: fx.Graph, kinds: dict[fx.Node, str]) -> dict[fx.Node, AttentionInfo]:
    found: dict[fx.Node, AttentionInfo] = {}
    for node in graph.nodes:
        if kinds.get(node) != "matmul":
            continue
        operands = matmul_operands(node)
        if len(operands) != 2:
            continue
        for probs_index in (0, 1):
            to_softmax = _walk_back(operands[probs_index], "softmax", kinds)
            if to_softmax is None:
                continue
            softmax = to_softmax[-1]
            to_scores = _walk_back(softmax.args[0], "matmul", kinds)
            if to_scores is None:
                continue
            scores = to_scores[-1]
            score_operands = matmul_operands(scores)
            if len(score_operands) != 2 or scores in found:
                continue
            query, key = (_strip(arg, kinds) for arg in score_operands)
            value = operands[1 - probs_index]
            if not all(isinstance(n, fx.Node) for n in (query, key, value)):
                continue
            parts = tuple(dict.fromkeys(n.name for n in to_softmax + to_scores))
            found[node] = AttentionInfo(query.name, key.name, value.name, parts)
            break
    return found


def fused_attention_info(node: fx.Node) -> AttentionInfo | None:
    """q, k, v of an sdpa call or an nn.MultiheadAttention module."""
    names = []
    for index, keyword in enumerate(("query", "key", "value")):
        arg = node.args[index] if index < len(node.args) else node.kwargs.get(keyword)
        if not isinstance(arg, fx.Node):
            return None
        names.append(arg.name)
    return AttentionInfo(*names)
