"""Graph patterns: named nodes, edges, and "reaches through any chain".

    graph:
      nodes:   {qkv: {kind: linear}, attn: {kind: attention}, proj: {kind: linear}}
      edges:   ["qkv ->* attn", "attn ->* proj"]    '->' one edge, '->*' a chain of 'through' ops
      through: [reshape, permute, getitem, split, dropout, ...]   ops a chain may pass (default: any);
               an entry may be a node predicate: {kind: add, data_inputs: 1} (a bias add, no residual)
      absent:  ["proj -> gate"]                     edges that must not exist (negative context)
      where:   [{same_channels: [qkv.in, proj.out]}, {all_paths: [qkv, proj]}, {not_gating: fc2}]
      anchor:  attn                                 matching starts at this (rare) node
      output:  proj

Matching, per anchor candidate (nodes passing the anchor's predicate, found
through the op-kind index): collect a window of nodes around it, walking
only through 'through' ops and nodes that could be pattern nodes; add an
edge for every direct data edge and every '->*' chain inside the window; and
let networkx's DiGraphMatcher enumerate subgraph monomorphisms of the pattern
into the window with the predicates as node matches. Windows are local, so
the cost grows linearly with the model. Matches sharing the anchor merge
into one region (BERT's separate q, k, v projections).

The search around one anchor may try at most GRAPH_SEARCH_STEPS candidate
pairs (limits.py): nine unconstrained nodes joined by '->*' would otherwise
enumerate billions of chains. Past the budget, matching stops with a
located RuleError naming the pattern and the budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import networkx as nx
from torch import fx

from utune_fx.match import limits
from utune_fx.match.graph_search import BudgetedMatcher, OverBudget, Window, holds_integers
from utune_fx.match.patterns import MatchContext, Pattern, best_near_miss, merge_by_output, region_of
from utune_fx.match.predicates import (
    NodeContext,
    Predicate,
    compile_predicate,
    data_inputs,
    tensor_inputs,
    tensor_users,
)
from utune_fx.match.source import Located, RuleError
from utune_fx.match.structure import Region, common_scope
from utune_fx.trace import OP_KINDS, node_info

_EDGE = re.compile(r"^\s*([A-Za-z_]\w*)\s*(->\*|->)\s*([A-Za-z_]\w*)\s*$")
_WINDOW_LIMIT = 400
_RADIUS = 16  # data edges from the anchor (Gemma 2: k_proj is 13 away, through RoPE, repeat_kv and soft-capping)


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    chain: bool  # '->*': through any number of 'through' ops; '->': one data edge


@dataclass(frozen=True)
class Through:
    """The ops a '->*' chain may pass: op kinds, or nodes passing a predicate; never a node whose
    tensor holds integers or booleans (indices, masks: DeepSeek-V3.2's top-k token selection feeds its
    attention's mask, not its queries, keys or values)."""

    kinds: frozenset[str]
    predicates: tuple[Predicate, ...] = ()

    def passes(self, node: fx.Node, ctx: NodeContext) -> bool:
        if holds_integers(node):
            return False
        return node_info(node).op_kind in self.kinds or any(p(node, ctx) is None for p in self.predicates)


@dataclass
class GraphPattern(Pattern):
    predicates: dict[str, Predicate]
    edges: list[Edge]
    absent: list[Edge]
    through: Through | None
    anchor_name: str
    output_name: str
    same_channels: list[tuple[tuple[str, str], tuple[str, str]]] = field(default_factory=list)
    all_paths: list[tuple[str, str]] = field(default_factory=list)  # (source, sink)
    not_gating: list[str] = field(default_factory=list)

    # -- window -------------------------------------------------------------------
    def _window(self, anchor: fx.Node, ctx: MatchContext) -> list[fx.Node]:
        """Nodes around the anchor: reached through 'through' ops or possible
        pattern nodes, within _RADIUS data edges (breadth first)."""
        hops = len(self.predicates) + 1
        seen = {anchor: (0, 0)}  # node -> (pattern-node hops, distance)
        frontier = [anchor]
        while frontier and len(seen) < _WINDOW_LIMIT:
            next_frontier = []
            for node in frontier:
                node_hops, distance = seen[node]
                if distance >= _RADIUS:
                    continue
                for neighbour in [*tensor_inputs(node), *tensor_users(node)]:
                    if neighbour in seen or neighbour.op == "output":
                        continue
                    passes = self.through is None or self.through.passes(neighbour, ctx.node_ctx)
                    could_be = any(p(neighbour, ctx.node_ctx) is None for p in self.predicates.values())
                    depth = node_hops + (1 if could_be and not passes else 0)
                    if depth > hops:
                        continue
                    seen[neighbour] = (depth, distance + 1)
                    if passes or could_be:
                        next_frontier.append(neighbour)
            frontier = next_frontier
        return list(seen)

    @property
    def positive(self) -> list[str]:
        """Pattern nodes that must be present (the others only appear in 'absent')."""
        on_edges = {e.source for e in self.edges} | {e.target for e in self.edges}
        return [n for n in self.predicates if n in on_edges or not self.edges]

    def _pattern_graph(self) -> nx.DiGraph:
        pattern = nx.DiGraph()
        pattern.add_nodes_from((name, {"role": name}) for name in self.positive)
        for edge in self.edges:
            pattern.add_edge(edge.source, edge.target, chain=edge.chain)
        return pattern

    # -- matching ------------------------------------------------------------------
    def _matches(self, anchor: fx.Node, ctx: MatchContext):
        window = Window(self._window(anchor, ctx), self.through, ctx.node_ctx)
        allowed = {
            name: {n for n in window.nodes if self.predicates[name](n, ctx.node_ctx) is None} for name in self.positive
        }
        allowed[self.anchor_name] &= {anchor}
        if any(not nodes for nodes in allowed.values()):
            return
        # The candidate graph: possible pattern nodes, with an edge wherever a
        # pattern edge could map (a direct data edge, or a chain of 'through' ops).
        graph = nx.DiGraph()
        for name, nodes in allowed.items():  # VF2 compares attributes, so predicates become roles
            for node in nodes:
                graph.add_node(node)
                graph.nodes[node].setdefault("roles", set()).add(name)
        for edge in self.edges:
            for source in allowed[edge.source]:
                reached = window.reach(source) if edge.chain else set(tensor_users(source))
                targets = allowed[edge.target] & reached
                window.spend(1 + len(targets))
                for target in targets:
                    graph.add_edge(source, target, direct=target in source.users, chain=target in window.reach(source))
        matcher = BudgetedMatcher(
            graph,
            self._pattern_graph(),
            window,
            node_match=lambda g, p: p["role"] in g.get("roles", ()),
            edge_match=lambda g, p: g["chain"] if p["chain"] else g["direct"],
        )
        for mapping in matcher.subgraph_monomorphisms_iter():
            captures = {p: g for g, p in mapping.items()}
            if self._admissible(captures, window, ctx):
                yield captures, window

    def _admissible(self, captures: dict[str, fx.Node], window: Window, ctx: MatchContext) -> bool:
        for source, sink in self.all_paths:
            window.spend(_WINDOW_LIMIT)  # what the walk may visit
            if not window.every_path_into(captures[sink], self.predicates[source], _WINDOW_LIMIT):
                return False
        for (a, a_side), (b, b_side) in self.same_channels:
            if _channels(captures[a], a_side) != _channels(captures[b], b_side):
                return False
        if any(window.gates(captures[gater]) for gater in self.not_gating):
            return False
        for edge in self.absent:
            source = captures[edge.source]
            reached = window.reach(source) if edge.chain else set(tensor_users(source))
            window.spend(1 + len(reached))
            targets = (
                [captures[edge.target]]
                if edge.target in captures
                else [n for n in reached if self.predicates[edge.target](n, ctx.node_ctx) is None]
            )
            if any(t in reached for t in targets):
                return False
        return True

    def find_all(self, ctx: MatchContext) -> list[Region]:
        anchor_predicate = self.predicates[self.anchor_name]
        regions = []
        for anchor in ctx.candidates(anchor_predicate):
            if anchor_predicate(anchor, ctx.node_ctx) is not None:
                continue
            merged: dict[str, list[fx.Node]] = {}
            nodes: set[fx.Node] = set()
            try:
                for captures, window in self._matches(anchor, ctx):
                    for name, node in captures.items():
                        merged.setdefault(name, [])
                        if node not in merged[name]:
                            merged[name].append(node)
                    nodes |= set(captures.values()) | self._between(captures, window)
            except OverBudget as over:
                where = f"around node {anchor.name} ({node_info(anchor).scope or 'the model'})"
                what = f"the graph search {where} took more than {over.budget:,} steps"
                raise RuleError(f"{self.origin or self.name}: {what}; {limits.GRAPH_SEARCH_STEPS.advice()}") from None
            if merged:
                sources = [n for name in merged if not any(e.target == name for e in self.edges) for n in merged[name]]
                inputs = [i for s in sources for i in data_inputs(s) if i not in nodes]
                output = merged[self.output_name][0]
                region = region_of(
                    self.name,
                    anchor,
                    nodes,
                    output,
                    {k: tuple(v) for k, v in merged.items()},
                    [i for i in inputs if i in ctx.input_dependent()] or inputs,
                )
                # where it reads and lives: its data path, not a constant branch shared with other blocks
                region.scope = common_scope(
                    [node_info(n).scope for n in nodes if n in ctx.input_dependent()]
                    or [node_info(n).scope for n in nodes]
                )
                regions.append(region)
        return merge_by_output(regions, ctx)

    def _between(self, captures: dict[str, fx.Node], window: Window) -> set[fx.Node]:
        """Nodes on the chains between captured nodes."""
        inner = set()
        for edge in self.edges:
            if edge.chain:
                source, target = captures[edge.source], captures[edge.target]
                window.spend(1 + len(window.reach(source)))
                inner |= {n for n in window.reach(source) if target in window.reach(n)}
        return inner

    def near_miss(self, ctx: MatchContext) -> str:
        anchor_predicate = self.predicates[self.anchor_name]
        anchors = [n for n in ctx.candidates(anchor_predicate) if anchor_predicate(n, ctx.node_ctx) is None]
        if not anchors:
            return best_near_miss(anchor_predicate, ctx.nodes, ctx, f"no {self.anchor_name}: ")
        anchor = anchors[0]
        window = self._window(anchor, ctx)
        for name in self.positive:
            if not any(self.predicates[name](n, ctx.node_ctx) is None for n in window):
                return best_near_miss(
                    self.predicates[name],
                    [n for n in window if n is not anchor],
                    ctx,
                    f"around {anchor.name} ({node_info(anchor).scope}) no {name}: ",
                )
        return (
            f"around {anchor.name} ({node_info(anchor).scope}) every node has a candidate, but no "
            f"assignment satisfies the edges {[f'{e.source}->{e.target}' for e in self.edges]}"
            + (", absent edges or where conditions" if self.absent or self.same_channels or self.not_gating else "")
        )


def _channels(node: fx.Node, side: str) -> int | None:
    tensor = data_inputs(node)[0] if side == "in" and data_inputs(node) else node
    shape = node_info(tensor).shape
    if not shape or len(shape) < 2:
        return None
    return shape[-1] if node_info(node).op_kind == "linear" else shape[1]


def _parse_edge(value: Located, names: dict[str, Predicate]) -> Edge:
    match = _EDGE.match(value.text())
    if not match:
        raise value.fail(f"bad edge {value.value!r}; write 'a -> b' (one data edge) or 'a ->* b' (a chain)")
    source, arrow, target = match.groups()
    for name in (source, target):
        if name not in names:
            raise value.fail(f"edge names '{name}', which is not in nodes ({', '.join(names)})")
    return Edge(source, target, arrow == "->*")


def _capture(value: Located, names: dict[str, Predicate]) -> tuple[str, str]:
    text = value.text()
    name, _, side = text.partition(".")
    if name not in names or side not in ("in", "out"):
        raise value.fail(f"expected 'NODE.in' or 'NODE.out' with NODE in nodes, got {text!r}")
    return name, side


WHERE_KEYS = {"same_channels": "[fc1.in, fc2.out]", "all_paths": "[fc1, fc2]", "not_gating": "fc2"}


def compile_graph(body: Located, name: str, within: Pattern | None, outside: Pattern | None = None) -> GraphPattern:
    fields = body.check_keys(
        ("nodes", "edges", "absent", "through", "where", "anchor", "output"), required=("nodes", "edges")
    )
    predicates = {key: compile_predicate(value) for key, value in fields["nodes"].mapping().items()}
    if not predicates:
        raise fields["nodes"].fail("a graph pattern needs at least one node")
    if len(predicates) > limits.GRAPH_PATTERN_NODES.value():
        what = f"{len(predicates)} nodes, more than {limits.GRAPH_PATTERN_NODES.value()}"
        raise fields["nodes"].fail(f"{what}; {limits.GRAPH_PATTERN_NODES.advice()}")
    edges = [_parse_edge(item, predicates) for item in fields["edges"].items()]
    absent = [_parse_edge(item, predicates) for item in fields["absent"].items()] if "absent" in fields else []
    through = None
    if "through" in fields:
        from utune_fx.match.predicates import _one_of

        entries = fields["through"].items() if isinstance(fields["through"].value, list) else [fields["through"]]
        kinds = [k for e in entries if not isinstance(e.value, dict) for k in _one_of(e, OP_KINDS, "op kind")]
        through = Through(frozenset(kinds), tuple(compile_predicate(e) for e in entries if isinstance(e.value, dict)))
    same_channels: list = []
    all_paths: list[tuple[str, str]] = []
    not_gating: list[str] = []
    for condition in fields["where"].items() if "where" in fields else []:
        entries = condition.check_keys(WHERE_KEYS)
        if len(entries) != 1:
            raise condition.fail(f"each where entry is one condition: {', '.join(WHERE_KEYS)}")
        key, value = next(iter(entries.items()))
        if key == "not_gating":
            if value.text() not in predicates:
                raise value.fail(f"'{value.text()}' is not in nodes ({', '.join(predicates)})")
            not_gating.append(value.text())
            continue
        pair = value.items()
        if len(pair) != 2:
            raise value.fail(f"{key} takes two entries, e.g. {WHERE_KEYS[key]}")
        if key == "same_channels":
            same_channels.append((_capture(pair[0], predicates), _capture(pair[1], predicates)))
        else:
            ends = [item.text() for item in pair]
            for item, end in zip(pair, ends):
                if end not in predicates:
                    raise item.fail(f"'{end}' is not in nodes ({', '.join(predicates)})")
            all_paths.append((ends[0], ends[1]))
    connected = {e.source for e in edges} | {e.target for e in edges}
    loose = [n for n in predicates if n not in connected and n not in {e.target for e in absent}]
    if loose and len(predicates) > 1:
        raise fields["nodes"].fail(f"node '{loose[0]}' is on no edge; connect it or remove it")
    anchor = _choose(fields.get("anchor"), predicates, connected or set(predicates), "anchor", rarest=True)
    sinks = [n for n in connected if not any(e.source == n for e in edges)] or list(predicates)
    output = _choose(fields.get("output"), predicates, set(sinks), "output", rarest=False)
    return GraphPattern(
        name,
        predicates,
        edges,
        absent,
        through,
        anchor,
        output,
        same_channels,
        all_paths,
        not_gating,
        within=within,
        outside=outside,
    )


# Rough frequency of op kinds in vision models: anchors on the rarest kind keep candidate lists short.
_RARITY = {
    "attention": 0,
    "softmax": 1,
    "matmul": 2,
    "embedding": 3,
    "pool": 4,
    "conv": 5,
    "mul": 6,
    "act": 7,
    "norm": 8,
    "linear": 9,
}


def _choose(value: Located | None, predicates: dict[str, Predicate], among: set[str], what: str, rarest: bool) -> str:
    if value is not None:
        name = value.text()
        if name not in predicates:
            raise value.fail(f"{what} '{name}' is not in nodes ({', '.join(predicates)})")
        return name
    ordered = sorted(among, key=lambda n: list(predicates).index(n))
    if not rarest:
        return ordered[-1]

    def rarity(name: str) -> int:
        kinds = predicates[name].kinds
        return min((_RARITY.get(k, 10) for k in kinds), default=11) if kinds else 12

    return min(ordered, key=rarity)
