"""Operations a user can target, found by structure in an annotated graph.

    annotated graph --find_operations--> [Operation(kind='attention', scope='blocks.0.attn',
                                                    inputs=('norm1',), output='proj', ...), ...]

Kinds and how each is recognised (never by module name):

- attention: an ``attention``-kind node, widened to the projections around
  it: back through layout/scaling/norm ops to the q/k/v linears, forward to
  the output linear.
- mlp: a linear or pointwise conv L2 whose every input path leads back,
  through activations, dropout, norms, gates and splits only (at least one
  activation), to linears or pointwise convs L1 with in_channels(L1) ==
  out_channels(L2); a gate such as squeeze-excitation (L2 feeding a
  multiplication with its own input) is not an mlp.
- residual: ``add(a, b)`` with a, b and the sum of one shape, where a is an
  ancestor of b (``x + f(x)``, also when f reads other inputs, as in CaiT's
  class attention), or else where the nearest node dominating the add on the
  data flow from the first input is a node x produced outside the module
  that writes the add (``f(x) + g(x)``, projected shortcuts); the region
  between holds a weighted op or a norm.
  ``x + pos_embed`` is no residual.
- block: the residual regions of one module (the module that writes the
  adds), merged.
- linear, conv, norm: single nodes of those kinds.

The graph algorithms (dominators) are networkx's. Every search is local to a
region, so the cost grows linearly with model depth.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx
from torch import fx

from utune_fx.trace import node_info
from utune_fx.trace.opkinds import WEIGHTED_KINDS

TARGET_KINDS = ("attention", "mlp", "block", "residual", "linear", "conv", "norm")
# Ops that sit between an attention node and its projections.
_ATTENTION_PASS = frozenset({
    "reshape", "permute", "getitem", "split", "cast", "identity", "dropout", "mul", "div",
    "norm", "arith", "cat", "shape", "other", "pad",
})
# Ops allowed inside an mlp between its two linears.
_MLP_PASS = frozenset({"act", "dropout", "norm", "mul", "getitem", "split", "identity", "cast", "reshape"})
# Ops an mlp output passes on its way to a gate (squeeze-excitation).
_GATE_PASS = frozenset({"act", "dropout", "identity", "cast"})


@dataclass
class Operation:
    kind: str
    index: int  # occurrence among operations of this kind, in graph order
    scope: str
    anchor: str  # the node that defines it (attention node, L2, the add, ...)
    inputs: tuple[str, ...]  # nodes it reads from outside
    output: str  # node whose value it produces
    nodes: tuple[str, ...] = ()  # every node inside, in graph order
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    contains: dict[str, int] = field(default_factory=dict)  # attention/mlp inside a block

    def as_dict(self) -> dict:
        return {
            "kind": self.kind, "index": self.index, "scope": self.scope, "anchor": self.anchor,
            "inputs": list(self.inputs), "output": self.output, "num_nodes": len(self.nodes),
            "in_shape": list(self.in_shape) if self.in_shape else None,
            "out_shape": list(self.out_shape) if self.out_shape else None,
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


def _kind(node: fx.Node) -> str:
    return node_info(node).op_kind


def _is_weight(node: fx.Node) -> bool:
    """A parameter or constant, possibly seen through layout ops (gamma.reshape(1, -1, 1, 1))."""
    while _kind(node) in ("permute", "reshape", "cast", "identity") and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return _kind(node) in ("param", "constant")


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs that carry tensors (shape arithmetic is not data flow)."""
    return [n for n in node.all_input_nodes if node_info(n).shape is not None or node_info(n).item_shapes]


def _data_inputs(node: fx.Node) -> list[fx.Node]:
    """Tensor inputs that are not weights."""
    return [n for n in _tensor_inputs(node) if not _is_weight(n)]


def _channels(op: fx.Node, of_input: bool) -> int | None:
    """In or out channels of a linear (last axis) or conv (axis 1)."""
    tensor = _data_inputs(op)[0] if of_input else op
    shape = node_info(tensor).shape
    if not shape or len(shape) < 2:
        return None
    return shape[-1] if _kind(op) == "linear" else shape[1]


def _is_pointwise(node: fx.Node, modules: dict) -> bool:
    """A linear, or a conv whose kernel is all ones and groups == 1."""
    kind = _kind(node)
    if kind == "linear":
        return True
    if kind != "conv":
        return False
    if node.op == "call_module":
        module = modules[str(node.target)]
        return set(module.kernel_size) == {1} and module.groups == 1
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    shape = node_info(weight).shape if isinstance(weight, fx.Node) else None
    return bool(shape) and set(shape[2:]) <= {1} and groups == 1


def _skip_source(node: fx.Node) -> fx.Node:
    """The tensor a skip connection carries, seen through identity, dropout,
    casts and scaling by a weight (MetaFormer's res_scale)."""
    while True:
        kind = _kind(node)
        inputs = _data_inputs(node)
        if len(inputs) != 1 or not (kind in ("identity", "dropout", "cast") or kind in ("mul", "div") and
                                    len(_tensor_inputs(node)) == 2):
            return node
        node = inputs[0]


def _walk(start: list[fx.Node], passable: frozenset[str], stop, limit: int = 64):
    """Back-walk from ``start`` through ``passable`` kinds; returns (stops, visited, dead_ends)."""
    stops, visited, dead = [], [], []
    frontier, seen = list(start), set()
    while frontier and len(seen) < limit:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if stop(node):
            stops.append(node)
        elif _kind(node) in passable:
            visited.append(node)
            frontier.extend(_data_inputs(node))
        else:
            dead.append(node)
    return stops, visited, dead


class _Finder:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.order = {node: i for i, node in enumerate(gm.graph.nodes)}
        self.by_name = {node.name: node for node in gm.graph.nodes}
        self.parts: dict[str, list[fx.Node]] = defaultdict(list)  # attention node name -> its parts
        for node in gm.graph.nodes:
            if node_info(node).part_of:
                self.parts[node_info(node).part_of].append(node)
        self.ops: dict[str, list[Operation]] = defaultdict(list)

    def add(self, kind: str, anchor: fx.Node, inputs: list[fx.Node], output: fx.Node, nodes: list[fx.Node],
            scope: str | None = None, **extra) -> Operation:
        nodes = sorted(set(nodes) | {output}, key=self.order.__getitem__)
        inputs = list(dict.fromkeys(inputs))
        op = Operation(
            kind=kind, index=len(self.ops[kind]),
            scope=scope if scope is not None else common_scope([node_info(n).scope for n in nodes]),
            anchor=anchor.name, inputs=tuple(n.name for n in inputs), output=output.name,
            nodes=tuple(n.name for n in nodes),
            in_shape=node_info(inputs[0]).shape if inputs else None,
            out_shape=node_info(output).shape, **extra,
        )
        self.ops[kind].append(op)
        return op

    def _between(self, start: fx.Node, sink: fx.Node) -> list[fx.Node] | None:
        """Nodes on data paths from ``start`` to ``sink`` (sink included), or None
        if ``start`` is not an ancestor. Only nodes after ``start`` in graph order
        are visited, so the search stays local to the region."""
        floor, found = self.order[start], False
        seen, frontier = {sink}, [sink]
        while frontier:
            for pred in _tensor_inputs(frontier.pop()):
                if pred is start:
                    found = True
                elif self.order[pred] > floor and pred not in seen:
                    seen.add(pred)
                    frontier.append(pred)
        return list(seen) if found else None

    def attention(self, node: fx.Node) -> None:
        if node.op == "call_module":  # nn.MultiheadAttention: one module is the whole operation
            self.add("attention", node, _data_inputs(node), node, [node], scope=node_info(node).scope)
            return
        info = node_info(node).attention
        qkv = [self.by_name[name] for name in (info.query, info.key, info.value)] if info else _data_inputs(node)
        parts = self.parts[node.name]
        projections, between, dead = _walk(qkv, _ATTENTION_PASS, lambda n: _kind(n) in ("linear", "conv"))
        inputs = [i for p in projections for i in _data_inputs(p)] + dead
        output, after = node, []
        while len(output.users) == 1:
            user = next(iter(output.users))
            if _kind(user) in ("linear", "conv"):
                output = user
                break
            if _kind(user) not in _ATTENTION_PASS:
                break
            after.append(user)
            output = user
        self.add("attention", node, inputs, output,
                 [node, *parts, *projections, *between, *(after if output is not node else [])])

    def mlp(self, last: fx.Node) -> None:
        if not _is_pointwise(last, self.modules) or not _data_inputs(last):
            return
        first, between, dead = _walk(_data_inputs(last)[:1], _MLP_PASS, lambda n: _is_pointwise(n, self.modules))
        if dead or not first or not any(_kind(n) == "act" for n in between):
            return
        if any(not _data_inputs(f) or _channels(f, of_input=True) != _channels(last, of_input=False) for f in first):
            return
        if self._feeds_gate(last):
            return
        inputs = [i for f in first for i in _data_inputs(f)]
        self.add("mlp", last, inputs, last, [*first, *between])

    def _feeds_gate(self, node: fx.Node) -> bool:
        for _ in range(4):
            for user in node.users:
                if _kind(user) == "mul" and len(_data_inputs(user)) == 2:
                    return True
            passing = [u for u in node.users if _kind(u) in _GATE_PASS]
            if len(passing) != 1:
                return False
            node = passing[0]
        return False

    def _residual_region(self, add: fx.Node, dominators: dict) -> tuple[fx.Node, list[fx.Node]] | None:
        """(start, region) of a residual add: a direct skip ``x + f(x)`` first,
        else the nearest dominator (projected shortcuts: ``f(x) + g(x)``)."""
        a, b = (_skip_source(n) for n in add.args[:2])
        for skip, branch in ((a, b), (b, a)):
            region = self._between(skip, branch)
            if region is not None:
                return skip, region + [add]
        start = dominators.get(add)
        if start is None or start is add:
            return None
        scope, start_scope = node_info(add).scope, node_info(start).scope
        if scope and (start_scope == scope or start_scope.startswith(scope + ".")):
            return None  # two branches merged inside one module (CoaT's attention + conv term)
        region = self._between(start, add)
        return (start, region) if region is not None else None

    def residuals(self) -> None:
        graph = nx.DiGraph()
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if not placeholders:
            return
        reachable = {placeholders[0]}
        for node in self.gm.graph.nodes:
            if node in reachable or any(p in reachable for p in node.all_input_nodes):
                reachable.add(node)
                graph.add_edges_from((p, node) for p in node.all_input_nodes if p in reachable)
        graph.add_node(placeholders[0])
        dominators = nx.immediate_dominators(graph, placeholders[0])
        blocks: dict[str, list[Operation]] = defaultdict(list)
        for node in self.gm.graph.nodes:
            if _kind(node) != "add":
                continue
            operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            shape = node_info(node).shape
            if len(operands) != 2 or not shape or any(node_info(a).shape != shape for a in operands):
                continue
            found = self._residual_region(node, dominators)
            if found is None:
                continue
            start, region = found
            weighted = [n for n in region if _kind(n) in WEIGHTED_KINDS or _kind(n) == "norm"]
            if not weighted:
                continue
            scope = node_info(node).scope or common_scope([node_info(n).scope for n in weighted])
            op = self.add("residual", node, [start], node, region, scope=scope)
            blocks[scope].append(op)
        self._blocks(blocks)

    def _blocks(self, blocks: dict[str, list[Operation]]) -> None:
        by_name = self.by_name
        inner = {kind: {op.anchor for op in self.ops[kind]} for kind in ("attention", "mlp")}
        for scope, residuals in sorted(blocks.items(), key=lambda kv: self.order[by_name[kv[1][0].anchor]]):
            names = {n for r in residuals for n in r.nodes}
            contains = {kind: len(anchors & names) for kind, anchors in inner.items() if anchors & names}
            self.add("block", by_name[residuals[-1].anchor], [by_name[residuals[0].inputs[0]]],
                     by_name[residuals[-1].output], [by_name[n] for n in names], scope=scope, contains=contains)

    def run(self) -> list[Operation]:
        for node in self.gm.graph.nodes:
            kind = _kind(node)
            if kind == "attention":
                self.attention(node)
            elif kind in ("linear", "conv"):
                self.mlp(node)
        self.residuals()
        for node in self.gm.graph.nodes:
            if _kind(node) in ("linear", "conv", "norm"):
                self.add(_kind(node), node, _data_inputs(node)[:1], node, [node], scope=node_info(node).scope)
        return [op for kind in TARGET_KINDS for op in self.ops[kind]]


def find_operations(gm: fx.GraphModule) -> list[Operation]:
    """Every targetable operation of an annotated graph, grouped by kind."""
    return _Finder(gm).run()
