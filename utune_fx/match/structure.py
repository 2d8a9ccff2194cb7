"""Regions, and the residual and block structure of an annotated graph.

    add(x, f(x))  ->  Region(kind='residual', inputs=(x,), output=add, nodes=f's nodes + add)
    the residuals one module writes  ->  Region(kind='block', ...)

- residual: ``add(a, b)`` of equal shapes where a is an ancestor of b
  (``x + f(x)``, seen through identity, dropout and scaling by a weight or a constant, also
  when f reads other inputs, as CaiT's class attention does), or else where
  a node produced outside the module that writes the add dominates it on the
  data flow from the first input (``f(x) + g(x)``, projected shortcuts; a norm
  of that module feeding both branches is the block's own: Hiera); the
  region between holds a weighted op or a norm. ``x + pos_embed`` is none.
- block: the residual regions written by one module, merged (a ViT block is
  two residuals, holding one attention and one mlp); single-residual
  sub-layers in a row, nested or distinct children of a module that is no
  Sequential, form one block (BERT and Hugging Face ViT write their
  attention and FFN residuals in sub-modules of the layer, T5 its
  self-attention, cross-attention and FFN); a module holding several
  residuals is a layer of its own, so a block never spans two layers;
  entry i of sibling module lists, run in turn by the model's loop, is one
  layer (XLM's attentions.i and ffns.i); each call of a module is its own (torch.export keys a second call
  'path@1': ALBERT runs one shared layer per block). An add inside an
  attention (scores + a position bias: MPNet), one whose every path goes
  into an attention's scores (SEW-D's c2p + p2c terms) or a composite op is
  none.

Dominators are networkx's; every other search is local to one region, and
only visits nodes after its start in graph order, so the cost grows
linearly with depth.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
from torch import fx

from utune_fx.match.predicates import data_inputs, tensor_inputs, tensor_users
from utune_fx.trace import node_info
from utune_fx.trace.opkinds import WEIGHTED_KINDS


@dataclass
class Region:
    """A matched operation: where it reads, what it produces, what it holds."""

    pattern: str
    index: int  # occurrence among this pattern's regions, in graph order
    scope: str
    anchor: fx.Node  # the node that defines it (attention node, an mlp's last linear, the add, ...)
    inputs: tuple[fx.Node, ...]
    output: fx.Node
    nodes: frozenset[fx.Node]
    captures: dict[str, tuple[fx.Node, ...]] = field(default_factory=dict)
    contains: dict[str, int] = field(default_factory=dict)  # for blocks: attention / mlp inside

    @property
    def in_shape(self) -> tuple[int, ...] | None:
        return node_info(self.inputs[0]).shape if self.inputs else None

    @property
    def out_shape(self) -> tuple[int, ...] | None:
        return node_info(self.output).shape

    def as_dict(self) -> dict:
        return {
            "pattern": self.pattern,
            "index": self.index,
            "scope": self.scope,
            "anchor": self.anchor.name,
            "inputs": [n.name for n in self.inputs],
            "output": self.output.name,
            "num_nodes": len(self.nodes),
            "in_shape": list(self.in_shape) if self.in_shape else None,
            "out_shape": list(self.out_shape) if self.out_shape else None,
            "captures": {k: [n.name for n in v] for k, v in self.captures.items()},
            **({"contains": self.contains} if self.contains else {}),
        }


def common_scope(scopes: list[str]) -> str:
    split = [s.split(".") if s else [] for s in scopes]
    prefix = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix)


def in_scope(node: fx.Node, scope: str) -> bool:
    """The node was produced by the module at ``scope`` or one inside it ('' is the whole model)."""
    own = node_info(node).scope
    return not scope or own == scope or own.startswith(scope + ".")


def _kind(node: fx.Node) -> str:
    return node_info(node).op_kind


def _floating(node: fx.Node) -> bool:
    """Residual streams carry features, not token ids."""
    return (node_info(node).dtype or "").startswith(("float", "bfloat"))


def _carries_features(node: fx.Node) -> bool:
    """A floating tensor, or a tuple of tensors (topk, chunk, split: the items say their dtypes)."""
    info = node_info(node)
    return _floating(node) or (info.dtype is None and bool(info.item_shapes))


def _skip_source(node: fx.Node) -> fx.Node:
    """The tensor a skip connection carries, seen through identity, dropout, casts, scaling by a
    weight (MetaFormer's res_scale) or a constant (Beam's depth-scaled residual add), and a shift
    by a weight where only the skip reads it (Zaya's (residual + b) * s; ViT's x + pos_embed, read by
    the first block's branch too, is where that skip starts)."""
    private = True  # every node so far is read by the skip alone
    while True:
        inputs = data_inputs(node)
        kind = _kind(node)
        private = private and len(node.users) == 1
        scales = kind in ("identity", "dropout", "cast", "mul", "div")  # one data input: a weight or a constant
        if len(inputs) != 1 or not (scales or private and kind in ("add", "sub")):
            return node
        node = inputs[0]


class _Residuals:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.order = {node: i for i, node in enumerate(gm.graph.nodes)}
        self.dominators = self._dominators()
        self.sums: set[fx.Node] = set()  # the residual adds found so far

    def _dominators(self) -> dict[fx.Node, fx.Node]:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if not placeholders:
            return {}
        root = placeholders[0]
        graph, reachable = nx.DiGraph(), {root}
        graph.add_node(root)
        for node in self.gm.graph.nodes:
            # features flow from the input; masks and sizes derived from token ids do not carry them
            # (Cohere's attention mask makes input_ids dominate its parallel attention + FFN sum)
            sources = [p for p in node.all_input_nodes if p in reachable and (p is root or _carries_features(p))]
            if node is not root and sources:
                reachable.add(node)
                graph.add_edges_from((p, node) for p in sources)
        return nx.immediate_dominators(graph, root)

    def between(self, start: fx.Node, sink: fx.Node) -> list[fx.Node] | None:
        """Nodes on data paths from ``start`` to ``sink`` (sink included), or None
        if ``start`` is not an ancestor; only nodes after ``start`` are visited."""
        floor, found = self.order[start], False
        seen, frontier = {sink}, [sink]
        while frontier:
            for pred in tensor_inputs(frontier.pop()):
                if pred is start:
                    found = True
                elif self.order[pred] > floor and pred not in seen:
                    seen.add(pred)
                    frontier.append(pred)
        return list(seen) if found else None

    def region(self, add: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
        a, b = (_skip_source(n) for n in add.args[:2])
        for skip, branch in ((a, b), (b, a)):
            found = self.between(skip, branch)
            if found is not None:
                return skip, found + [add]
        start = self.dominators.get(add)
        if start is None or start in (add, a, b) or not _floating(start):
            return None  # x + g(): g does not read x (position embeddings looked up from an arange)
        scope = node_info(add).scope
        if start not in self.sums:  # a sub-layer may start at the sum of the one before (hyper-connections)
            start = self._before_shared_norm(start, scope)
        if start is None:
            return None  # two branches merged inside one module (CoaT's attention + conv term)
        found = self.between(start, add)
        if found is None or any(_kind(n) == "attention" and node_info(n).scope == scope for n in found):
            return None  # the attention's own module sums it with another branch (Nystromformer's conv of V)
        if any(n in self.sums and not in_scope(n, scope) for n in found):
            return None  # two streams from different layers meet (Zaya's router states, carried to the next layer)
        return start, found

    @staticmethod
    def _before_shared_norm(start: fx.Node, scope: str) -> fx.Node | None:
        """Where branches that meet in ``scope`` start, if outside it: a norm inside the module that
        feeds both a projected shortcut and the branch (Hiera's stage changes: proj(norm1(x)) +
        attn(norm1(x))) is the block's own, so the skip starts at the norm's input; so is a cast
        (Cohere's written-out LayerNorm starts with x.to(float32), which its parallel attention and
        FFN sum reads as the skip)."""

        def inside(node: fx.Node) -> bool:
            return bool(scope) and in_scope(node, scope)

        while inside(start) and _kind(start) in ("norm", "cast") and len(data_inputs(start)) == 1:
            start = data_inputs(start)[0]
        return None if inside(start) else start

    def find(self) -> list[Region]:
        regions = []
        attentions = {node.name for node in self.gm.graph.nodes if _kind(node) == "attention"}
        for node in self.gm.graph.nodes:
            if node_info(node).part_of or _feeds_attention_only(node, attentions):
                continue  # scores + a position bias inside an attention (MPNet, SEW-D), a composite's sum
            operands = [a for a in node.args[:2] if isinstance(a, fx.Node)] if _kind(node) == "add" else []
            shape = node_info(node).shape
            if len(operands) != 2 or not shape or any(node_info(a).shape != shape for a in operands):
                continue
            found = self.region(node)
            if found is None:
                continue
            start, nodes = found
            weighted = [n for n in nodes if _kind(n) in WEIGHTED_KINDS or _kind(n) == "norm"]
            if weighted:
                scope = node_info(node).scope or common_scope([node_info(n).scope for n in weighted])
                regions.append(Region("residual", len(regions), scope, node, (start,), node, frozenset(nodes)))
                self.sums.add(node)
        return regions


def _feeds_attention_only(node: fx.Node, attentions: set[str], depth: int = 4) -> bool:
    """A sum that every path takes into an attention's scores within a few elementwise steps:
    SEW-D's disentangled position terms c2p + p2c, added to Q K^T before the softmax."""
    if depth == 0:
        return False
    users = tensor_users(node)
    return bool(users) and all(
        node_info(user).part_of in attentions
        or _kind(user) in ("mul", "div", "add", "cast", "reshape", "permute")
        and _feeds_attention_only(user, attentions, depth - 1)
        for user in users
    )


def find_residuals(gm: fx.GraphModule) -> list[Region]:
    return _Residuals(gm).find()


def _follows(residual: Region, previous: Region) -> bool:
    """The residual's skip starts at the previous one's output (or its post-norm, or a slice that keeps
    all of it)."""
    node = residual.inputs[0]
    while node is not previous.output:
        inputs = data_inputs(node)
        if len(inputs) != 1 or not (_kind(node) in ("norm", "identity", "dropout", "cast") or _whole_slice(node)):
            return False
        node = inputs[0]
    return True


def _whole_slice(node: fx.Node) -> bool:
    """x[:, :n] that keeps all of x (LUKE slices its word tokens back out of a sequence with no entities)."""
    inputs = data_inputs(node)
    return _kind(node) == "getitem" and len(inputs) == 1 and node_info(node).shape == node_info(inputs[0]).shape


_CONTAINERS = (
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.container.ModuleDict",
)


def module_call(node: fx.Node, scope: str) -> str:
    """Which call of the module at ``scope`` produced ``node``: torch.export keys a module's second
    call 'path@1' (ALBERT runs one layer for every block); one key per module otherwise."""
    for key, value in (node.meta.get("nn_module_stack") or {}).items():
        if isinstance(value, tuple) and value and value[0] == scope:
            return key
    return scope


def _signature(residual: Region, child: str) -> tuple:
    """What tells two sub-layers apart: the module class and the weighted ops and norms inside."""
    classes = dict(node_info(residual.anchor).scope_stack)
    held = Counter(_kind(n) for n in residual.nodes if _kind(n) in WEIGHTED_KINDS or _kind(n) == "norm")
    return classes[child], tuple(sorted(held.items()))


def _layer_scope(parts: list[Region], residuals: list[Region]) -> str | None:
    """The module single-residual sub-layers in a row share, if they form one layer: one inside
    the other (HF ViT), or distinct sub-layers of one module that is no container, each holding
    no other residual (BERT's attention.output and output in BertLayer; T5's self-attention,
    cross-attention and FFN in T5Block). Blocks side by side in a Sequential, or like blocks of
    one residual each in a ModuleList, stay apart."""
    scopes = [r.scope for r in parts]
    zipped = _zipped_lists(scopes)
    if zipped is not None:
        return zipped
    common = common_scope(scopes)
    if len({module_call(r.anchor, common) for r in parts}) != 1:
        return None  # several calls of one module (a shared layer run again)
    if common in scopes:
        return common
    stacks = [dict(node_info(r.anchor).scope_stack) for r in parts]
    shared = [path for path in stacks[0] if all(path in stack for stack in stacks[1:])]
    if not shared or stacks[0][shared[-1]] in _CONTAINERS:
        return None
    layer, signatures = shared[-1], set()
    for residual, stack in zip(parts, stacks):
        child = next((path for path in stack if path.startswith(layer + ".")), None)
        if child is None or sum(1 for r in residuals if r.scope == child or r.scope.startswith(child + ".")) != 1:
            return None  # a whole layer of its own (T5's next block)
        signatures.add(_signature(residual, child))
    return layer if len(signatures) == len(parts) else None


def _zipped_lists(scopes: list[str]) -> str | None:
    """XLM's layout: the model's own loop runs entry i of sibling module lists in turn (attentions.i,
    then ffns.i); sub-layers in a row that are one index of distinct lists under one parent are one
    layer, scoped at the parent."""
    lists, _, indices = zip(*(scope.rpartition(".") for scope in scopes))
    parents = {path.rpartition(".")[0] for path in lists}
    index = indices[0]
    if not index.isdigit() or set(indices) != {index} or len(set(lists)) != len(lists) or len(parents) != 1:
        return None
    return parents.pop()


def _leading(first: Region, scope: str) -> set[fx.Node]:
    """What the block's module computes, in the same call, before its first residual starts: SigLIP's
    pooling head attends (a learned query, no residual) and then adds its MLP to that attention's
    output, so the attention belongs to the block. Empty where the skip starts outside the module."""
    start = first.inputs[0] if first.inputs else None
    if start is None or not scope or not in_scope(start, scope):
        return set()
    call = module_call(first.anchor, scope)
    found, frontier = set(), [start]
    while frontier:
        node = frontier.pop()
        if node in found or not in_scope(node, scope) or module_call(node, scope) != call:
            continue
        found.add(node)
        frontier.extend(node.all_input_nodes)
    return found


def group_blocks(residuals: list[Region]) -> list[Region]:
    """Blocks: the residuals one module writes; and single-residual sub-layers in a row that
    form one layer (see _layer_scope)."""
    calls = {id(r): module_call(r.anchor, r.scope) for r in residuals}
    per_call = Counter(calls.values())
    groups: list[tuple[str, list[Region]]] = []
    by_call: dict[str, int] = {}
    for residual in residuals:
        last = groups[-1] if groups else None
        layer = None
        if last and all(per_call[calls[id(r)]] == 1 for r in (*last[1], residual)) and _follows(residual, last[1][-1]):
            layer = _layer_scope([*last[1], residual], residuals)
        if calls[id(residual)] in by_call:
            groups[by_call[calls[id(residual)]]][1].append(residual)
        elif layer is not None:
            groups[-1] = (layer, last[1] + [residual])
        else:
            by_call[calls[id(residual)]] = len(groups)
            groups.append((residual.scope, [residual]))
    blocks = []
    for scope, parts in groups:
        nodes = frozenset().union(*(r.nodes for r in parts), _leading(parts[0], scope))
        blocks.append(Region("block", len(blocks), scope, parts[-1].anchor, parts[0].inputs, parts[-1].output, nodes))
    return blocks
