"""The search side of graph patterns: the window of nodes around one anchor, and a VF2
matcher that spends that window's budget of steps.

    window = Window(nodes, through, node_ctx)      nodes near the anchor; window.reach(n) memoised
    BudgetedMatcher(graph, pattern, window, ...)    networkx's DiGraphMatcher, one step per candidate pair
    window.spend(n)                                 raises OverBudget past GRAPH_SEARCH_STEPS (limits.py)
    window.every_path_into(fc2, is_fc1, limit)      all_paths: every data path into fc2 starts at an fc1
    window.gates(fc2)                               fc2's value scales another tensor (squeeze-excitation)

Every part of matching around one anchor that can grow with the pattern (building the
candidate graph, the subgraph search, checking absent edges and paths, collecting chains)
spends from one budget, so a hostile pattern stops at its first anchor, in a bounded time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import networkx as nx
from networkx.algorithms.isomorphism import DiGraphMatcher
from torch import fx

from utune_fx.match import limits
from utune_fx.match.predicates import NodeContext, Predicate, data_inputs, tensor_users
from utune_fx.trace import node_info

if TYPE_CHECKING:
    from utune_fx.match.graph_pattern import Through


def holds_integers(node: fx.Node) -> bool:
    """Indices, masks, token ids: tensors that carry no features."""
    return (node_info(node).dtype or "float").startswith(("int", "uint", "bool"))


class OverBudget(Exception):
    """The search around one anchor took more steps than its budget."""

    def __init__(self, budget: int):
        super().__init__(budget)
        self.budget = budget


class BudgetedMatcher(DiGraphMatcher):
    """VF2 that spends a step of the window's budget per candidate pair it tries (its unit of work)."""

    def __init__(self, graph: nx.DiGraph, pattern: nx.DiGraph, window: Window, **kwargs):
        super().__init__(graph, pattern, **kwargs)
        self.window = window

    def candidate_pairs_iter(self):
        self.window.spend(1)  # listing the candidates costs work even when there are none
        for pair in super().candidate_pairs_iter():
            self.window.spend(1)
            yield pair


class Window:
    """Nodes around one anchor, with memoised '->*' reachability inside them, and the budget of
    steps the search around the anchor may take (GRAPH_SEARCH_STEPS)."""

    def __init__(self, nodes: list[fx.Node], through: Through | None, ctx: NodeContext):
        self.nodes = nodes
        self.inside = set(nodes)
        self.through = through
        self.ctx = ctx
        self._reach: dict[fx.Node, set[fx.Node]] = {}
        self.budget, self.steps = limits.GRAPH_SEARCH_STEPS.value(), 0

    def spend(self, steps: int) -> None:
        self.steps += steps
        if self.steps > self.budget:
            raise OverBudget(self.budget)

    def reach(self, start: fx.Node) -> set[fx.Node]:
        """Nodes ``start`` reaches by data edges whose inner nodes are 'through' ops."""
        if start not in self._reach:
            found, frontier = set(), [u for u in tensor_users(start) if u in self.inside]
            while frontier:
                node = frontier.pop()
                if node in found:
                    continue
                found.add(node)
                if self.through is None or self.through.passes(node, self.ctx):
                    frontier.extend(u for u in tensor_users(node) if u in self.inside)
            self._reach[start] = found
        return self._reach[start]

    def every_path_into(self, sink: fx.Node, is_source: Predicate, limit: int) -> bool:
        """Every data path into ``sink`` comes, through 'through' ops, from a node passing ``is_source``;
        a path from a mask (VITS multiplies its FFN's hidden features by the padding mask) carries no
        features. False past ``limit`` nodes."""
        frontier, seen = list(data_inputs(sink)), set()
        while frontier:
            node = frontier.pop()
            if node in seen:
                continue
            seen.add(node)
            if is_source(node, self.ctx) is None or holds_integers(node):
                continue
            if self.through is not None and not self.through.passes(node, self.ctx) or len(seen) > limit:
                return False
            frontier.extend(data_inputs(node))
        return True

    def gates(self, gater: fx.Node) -> bool:
        """Whether ``gater``'s value, through 'through' ops, multiplies a tensor of the product's whole
        shape: it then scales that tensor, as a squeeze-excitation gate scales the input it pooled. A
        weight or mask broadcast over it (hyper-connections' per-stream weights, VITS' padding mask)
        leaves it the value."""
        reached = self.reach(gater)
        return any(
            node_info(other).shape == node_info(node).shape
            for node in reached
            if node_info(node).op_kind == "mul"
            for other in data_inputs(node)
            if other not in reached and other is not gater
        )
