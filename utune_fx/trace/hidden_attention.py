"""Nodes of a torch.fx graph that hide an attention inside one call.

    %a = call_module[target=layers.0.self_attn](x, x, x)    nn.MultiheadAttention, an fx leaf
    %b = call_function[target=shifted_window_attention](...) a function fx keeps whole (torch.fx.wrap,
                                                              timm's no-trace functions)
    -> ('layers.0.self_attn', 'MultiheadAttention', 'computes attention in one node ...')
       ('features.1.0.attn', 'ShiftedWindowAttention', 'calls ...shifted_window_attention(), which ...')

Rules cannot reach the projections inside such a node, so the trace report lists it as opaque (and
``auto`` tries torch.export, which sees inside). A module counts when its kind is ``attention``; a
Python function outside torch counts when its own computation, traced alone on the example values
(make_fx), holds an attention as :mod:`.attention` defines it: sdpa or softmax(QK^T)V. The example
values are meta stand-ins (nothing is computed; see :mod:`.shape_propagation`), real ones only
where the graph does not run on the meta device.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from utune_fx.trace.annotate import annotate, node_info
from utune_fx.trace.opkinds import module_kind
from utune_fx.trace.shape_propagation import MetaInterpreter, MetaShadow

_LIBRARY_MODULES = frozenset({"torch", "operator", "_operator", "builtins", "math"})
_MHA_REASON = (
    "computes attention in one node (torch.fx keeps nn.MultiheadAttention whole): "
    "its q/k/v and output projections are out of reach of rules"
)


def _is_wrapped_function(node: fx.Node) -> bool:
    """A call of a plain Python function from outside torch: fx recorded it without tracing into it."""
    target = node.target
    home = (getattr(target, "__module__", None) or "").split(".")[0]
    return node.op == "call_function" and inspect.isfunction(target) and home not in _LIBRARY_MODULES


def computes_attention(fn: Any, args: tuple, kwargs: dict) -> bool:
    """Whether ``fn(*args, **kwargs)`` holds an attention, by tracing that one call with make_fx."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    def call(*tensors: torch.Tensor) -> Any:
        filled = list(leaves)
        for index, tensor in zip(where, tensors):
            filled[index] = tensor
        call_args, call_kwargs = pytree.tree_unflatten(filled, spec)
        return fn(*call_args, **call_kwargs)

    tensors = [leaves[i] for i in where]
    try:
        with torch.no_grad():
            graph_module = make_fx(call, pre_dispatch=True)(*tensors)
            annotate(graph_module, tensors)
    except Exception:  # it cannot be traced alone: nothing is known about what it computes
        return False
    return any(node_info(node).op_kind == "attention" for node in graph_module.graph.nodes)


class _Done(Exception):
    """Every wanted node has been looked at; the rest of the graph need not run."""


class _CallRecorder(MetaInterpreter):
    """Runs the graph on the example inputs (on meta stand-ins when given a shadow) and checks each
    wanted call on the values it receives."""

    def __init__(self, gm: fx.GraphModule, wanted: list[fx.Node], shadow: MetaShadow | None):
        super().__init__(gm, shadow)
        self.wanted = set(wanted)
        self.hides: dict[fx.Node, bool] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n in self.wanted:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.hides[n] = computes_attention(n.target, args, kwargs)
            if len(self.hides) == len(self.wanted):
                raise _Done
        return super().run_node(n)


def _wrapped_calls(gm: fx.GraphModule, inputs: tuple[Any, ...], functions: list[fx.Node]) -> dict[fx.Node, bool]:
    """Whether each wrapped call hides an attention: the graph runs on meta stand-ins (nothing
    computed; make_fx traces the call on meta tensors), or for real where the meta run fails."""
    for shadow in (MetaShadow(), None):
        recorder = _CallRecorder(gm, functions, shadow)
        device = torch.device("meta") if shadow else contextlib.nullcontext()
        try:
            with torch.no_grad(), device:
                recorder.run(*(shadow.value(inputs) if shadow else inputs))
        except _Done:
            pass
        except Exception:  # meta: try for real; real: the graph does not run, annotation says so
            if shadow:
                continue
        return recorder.hides
    return {}


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next((path for path, _ in reversed(list(stack.values())) if path), "")


def hidden_attention(
    gm: fx.GraphModule, inputs: tuple[Any, ...], modules: dict[str, nn.Module]
) -> list[tuple[str, str, str]]:
    """(module path, class, why) for every node of ``gm`` that computes attention out of the rules' sight."""
    functions = [node for node in gm.graph.nodes if _is_wrapped_function(node)]
    hides = _wrapped_calls(gm, inputs, functions) if functions else {}
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and module_kind(gm.get_submodule(str(node.target))) == "attention":
            module = gm.get_submodule(str(node.target))
            found.append((str(node.target), type(module).__name__, _MHA_REASON))
        elif hides.get(node):
            scope = _scope(node)
            owner = type(modules[scope]).__name__ if scope in modules else "(function)"
            function = f"{node.target.__module__}.{node.target.__name__}"
            why = (
                f"calls {function}(), which computes attention inside one node "
                "(torch.fx does not trace into wrapped functions)"
            )
            found.append((scope, owner, why))
    return found
