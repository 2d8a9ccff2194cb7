"""The search side of graph patterns: the window of nodes around one anchor, and a VF2
matcher that spends that window's budget of steps.

    window = Window(nodes, through, node_ctx)      nodes near the anchor; window.reach(n) memoised
    BudgetedMatcher(graph, pattern, window, ...)    networkx's DiGraphMatcher, one step per candidate pair
    window.spend(n)                                 raises OverBudget past GRAPH_SEARCH_STEPS (limits.py)
    window.gates_its_input(fc2, fc1)                a squeeze-excitation gate: fc2's value scales fc1's input

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
from utune_fx.match.predicates import NodeContext, data_inputs, tensor_users
from utune_fx.trace import node_info

if TYPE_CHECKING:
    from utune_fx.match.graph_pattern import Through

_SAME_TENSOR = frozenset({"reshape", "permute", "cast", "identity", "getitem"})
_FEEDER_HOPS = 16  # data edges back from the gated pattern's input (an SE block pools its input, then fc1)


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

    def _feeders(self, node: fx.Node) -> set[fx.Node]:
        """The tensors ``node`` reads, within _FEEDER_HOPS data edges back."""
        found, frontier = set(), [node]
        for _ in range(_FEEDER_HOPS):
            frontier = [i for n in frontier for i in data_inputs(n) if i not in found]
            self.spend(1 + len(frontier))
            found.update(frontier)
        return found

    def gates_its_input(self, gater: fx.Node, fed: fx.Node) -> bool:
        """Whether ``gater``'s value, through 'through' ops, scales a tensor that ``fed`` also reads
        (reshaped at most), the product taking that tensor's shape: a squeeze-excitation gate scales
        the input it pooled. A product with a tensor from elsewhere (hyper-connections' per-stream
        output weights) or with a mask broadcast over it (VITS' padding mask) is no such gate."""
        reached = self.reach(gater)
        others = [
            other
            for node in reached
            if node_info(node).op_kind == "mul"
            for other in data_inputs(node)
            if other not in reached and other is not gater and node_info(other).shape == node_info(node).shape
        ]
        if not others:
            return False
        feeders = self._feeders(fed)
        return any(node in feeders for other in others for node in _reshapes_of(other))


def _reshapes_of(node: fx.Node) -> list[fx.Node]:
    """``node`` and the tensors it is a reshape, cast or item of, back to the first other op."""
    chain = [node]
    while node_info(chain[-1]).op_kind in _SAME_TENSOR and data_inputs(chain[-1]) and len(chain) < _FEEDER_HOPS:
        chain.append(data_inputs(chain[-1])[0])
    return chain
