"""Specialise Python branches on tensor shapes to the example inputs.

    B, H, W, C = x.shape
    pad_b = (self.ws - H % self.ws) % self.ws
    if pad_b > 0:                  # plain fx: TraceError, Proxy used in control flow
        x = F.pad(x, ...)
    ->  the condition depends on shapes only, so it is evaluated on the example
        inputs and the branch taken is traced; the report lists each decision
        as 'twins.py:87 -> False'.

A condition that reads tensor *values* (``if x.sum() > 0``) is never
specialised: it still fails, and the module around it becomes a leaf. Shape
arithmetic itself stays symbolic in the graph, so a decision is the only
thing fixed to the example shapes (typically spatial padding, never batch).
The graph built so far is evaluated on meta stand-ins of the inputs and weights
(:mod:`.shape_propagation`): shapes only, nothing computed; for real only where
the meta device cannot run an op.
"""

from __future__ import annotations

import contextlib
import operator
import os
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from utune_fx.trace.shape_propagation import MetaShadow

_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_nested", "is_cuda"})
_SHAPE_METHODS = frozenset({"size", "dim", "numel", "ndimension"})
_SCALAR_MODULES = frozenset({"_operator", "operator", "math", "builtins"})


def _is_scalar_function(target: Any) -> bool:
    return getattr(target, "__module__", None) in _SCALAR_MODULES or target in vars(operator).values()


class ShapeBranches:
    """Evaluates shape-only conditions while a graph is being traced."""

    def __init__(self, root: nn.Module, inputs: Sequence[Any]):
        self.root = root
        self.inputs = inputs
        self.values: dict[fx.Node, Any] = {}
        self.shape_only: dict[fx.Node, bool] = {}
        self.decisions: list[str] = []
        self.evaluating = False  # the tracer runs modules for real while this is set
        self.shadow: MetaShadow | None = MetaShadow()  # None once a meta evaluation has failed

    def depends_on_shapes_only(self, node: fx.Node) -> bool:
        if node in self.shape_only:
            return self.shape_only[node]
        if node.op == "call_function" and node.target is getattr:
            result = node.args[1] in _SHAPE_ATTRIBUTES
        elif node.op == "call_method" and node.target in _SHAPE_METHODS:
            result = True
        elif node.op == "call_function" and _is_scalar_function(node.target):
            result = all(self.depends_on_shapes_only(n) for n in node.all_input_nodes)
        else:
            result = False
        self.shape_only[node] = result
        return result

    def evaluate(self, target: fx.Node) -> Any:
        """Run the graph built so far on the example inputs, up to ``target``: on meta stand-ins
        (nothing computed), or for real once a meta run has failed."""
        if self.shadow is not None:
            try:
                return self._evaluate(target)
            except Exception:  # an op the meta device cannot run: from now on, for real
                self.shadow, self.values = None, {}
        return self._evaluate(target)

    def _evaluate(self, target: fx.Node) -> Any:
        placeholders = 0
        self.evaluating = True
        device = torch.device("meta") if self.shadow is not None else contextlib.nullcontext()
        try:
            with torch.no_grad(), device:
                for node in target.graph.nodes:
                    if node.op == "placeholder":
                        placeholders += 1
                    if node not in self.values:
                        self.values[node] = self._run(node, placeholders - 1)
                    if node is target:
                        return self.values[node]
        finally:
            self.evaluating = False
        raise KeyError(f"{target} is not in its graph")

    def _run(self, node: fx.Node, placeholder_index: int) -> Any:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.values.__getitem__)
        if node.op == "placeholder":
            value = self.inputs[placeholder_index] if placeholder_index < len(self.inputs) else args[0]
            return self.shadow.value(value) if self.shadow is not None else value
        if node.op == "get_attr":
            value = operator.attrgetter(str(node.target))(self.root)
            return self.shadow.value(value) if self.shadow is not None else value
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            module = self.root.get_submodule(str(node.target))
            return (self.shadow.module(module) if self.shadow is not None else module)(*args, **kwargs)
        raise ValueError(f"cannot evaluate {node.op} node {node}")

    def decide(self, node: fx.Node) -> bool:
        value = bool(self.evaluate(node))
        self.decisions.append(f"{_caller()} -> {value}")
        return value


def _caller() -> str:
    """file:line of the model code that branched (outside torch.fx and this file)."""
    skip = (f"{os.sep}torch{os.sep}fx{os.sep}", f"{os.sep}utune_fx{os.sep}trace{os.sep}")
    frames = [f for f in traceback.extract_stack() if not any(s in f.filename for s in skip)]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
