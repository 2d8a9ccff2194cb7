"""torch.fx symbolic tracing with leaf fallback and specialised default inputs.

    model.forward(x, attn_mask=None, is_causal=False)
        -> GraphModule.forward(x)          defaulted inputs specialised away

    if pad_b > 0: ...  (pad_b computed from x.shape)
        -> branch decided on the example inputs (see :mod:`.shape_branches`)

    blocks.3.attn raises during tracing (data-dependent control flow)
        -> retried with blocks.3.attn as a leaf: one call_module node,
           reported as opaque with the reason, the rest of the model traced

Leaves: torch.nn primitives (no children), nn.MultiheadAttention (one
attention operation), and modules that failed to trace. Failed modules and
nodes that hide an attention (nn.MultiheadAttention, a wrapped function that
computes attention, see :mod:`.hidden_attention`) are reported as opaque. timm's no-trace
*modules* are traced through: most were registered for shape-dependent
branches, which are specialised here, and hiding them would hide the
attention inside Twins, MobileViT or TinyViT; any that still fail become
leaves like every other module. timm's no-trace functions (and torch's
transformer helpers that branch on tensor attributes) are autowrapped: they
appear as single call_function nodes. The MHA fast path is switched off while tracing, so
nn.TransformerEncoder(Layer) takes its traceable Python path.
"""

from __future__ import annotations

import inspect
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph import CodeGen, _PyTreeCodeGen
from torch.utils import _pytree as pytree

from utune_fx.errors import first_line
from utune_fx.trace.hidden_attention import hidden_attention
from utune_fx.trace.shape_branches import ShapeBranches

_ALWAYS_LEAF: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)
# Private torch helpers that branch on tensor attributes (``src.is_nested``);
# fx's autowrap skips names starting with '_', so they are patched here.
_PRIVATE_NOTRACE = ((torch.nn.modules.transformer, "_get_seq_len"),)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_MAX_FALLBACKS = 64
_SPECIALISATION_CHECKS = frozenset({"_assert_is_none", "_assert", "eq"})


@dataclass(frozen=True)
class OpaqueModule:
    """A submodule traced as one node because tracing into it failed, or one whose node hides an
    attention (nn.MultiheadAttention, a wrapped function that computes attention)."""

    path: str
    class_name: str
    reason: str


class FxTraceFailure(Exception):
    """The model's own forward (not a submodule) cannot be traced by fx."""


def _model_code_location(error: BaseException) -> str:
    """file:line of the innermost frame outside torch.fx and utune_fx's tracer: the model's code."""
    ours = (f"{os.sep}torch{os.sep}fx{os.sep}", f"{os.sep}utune_fx{os.sep}trace{os.sep}")
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not any(p in f.filename for p in ours)]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


def trace_failure(error: BaseException) -> str:
    return f"{first_line(error)} (at {_model_code_location(error)})"


def _timm_notrace_functions() -> tuple[Any, ...]:
    try:
        from timm.layers import get_notrace_functions
    except ImportError:
        return ()
    return tuple(f for f in get_notrace_functions() if callable(f))


class _Tracer(fx.Tracer):
    # Buffers become get_attr nodes like parameters, so code can slice them by
    # symbolic sizes (GPT's causal mask[:, :, :T, :T]).
    proxy_buffer_attributes = True

    def __init__(
        self, leaf_types: tuple[type, ...], leaf_paths: set[str], autowrap: tuple[Any, ...], branches: ShapeBranches
    ):
        super().__init__(autowrap_functions=autowrap)
        self.leaf_types = leaf_types
        self.leaf_paths = leaf_paths
        self.branches = branches
        self.failed_path: str | None = None  # innermost module whose forward raised
        self._tensor_names: dict[int, str] | None = None

    def to_bool(self, obj: fx.Proxy) -> bool:
        if self.branches.depends_on_shapes_only(obj.node):
            return self.branches.decide(obj.node)
        return super().to_bool(obj)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths or isinstance(m, self.leaf_types):
            return True
        from_torch_nn = type(m).__module__.startswith(("torch.nn", "torch.ao.nn"))
        return from_torch_nn and not isinstance(m, _CONTAINERS) and not any(True for _ in m.children())

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        """fx's getattr, with the parameter's name looked up in an index:
        fx scans root.named_parameters() on every access, O(params^2) per trace."""
        if self.branches.evaluating or not isinstance(attr_val, torch.Tensor):
            return attr_val
        if self._tensor_names is None:
            self._tensor_names = {}
            for name, tensor in [*self.root.named_parameters(), *self.root.named_buffers()]:
                self._tensor_names.setdefault(id(tensor), name)
        name = self._tensor_names.get(id(attr_val))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if self.branches.evaluating:  # fx patches Module.__call__; evaluation must run, not trace
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                self.failed_path = self.path_of_module(m)
            raise


def defaulted_inputs(model: nn.Module, n_given: int) -> dict[str, Any]:
    """forward() parameters beyond the example inputs, with their defaults."""
    specialised = {}
    params = [
        p
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    for param in params[n_given:]:
        if param.default is inspect.Parameter.empty:
            raise TypeError(f"forward() needs input '{param.name}' but only {n_given} example input(s) were given")
        specialised[param.name] = param.default
    return specialised


def _drop_specialised_inputs(graph: fx.Graph, n_inputs: int) -> None:
    """Remove the placeholders fx keeps for concrete args, and their checks."""
    for node in [n for n in graph.nodes if n.op == "placeholder"][n_inputs:]:
        doomed, frontier = [], [node]
        while frontier:
            current = frontier.pop()
            doomed.append(current)
            for user in current.users:
                name = getattr(user.target, "__name__", str(user.target))
                if name not in _SPECIALISATION_CHECKS:
                    raise AssertionError(f"specialised input {node.target} is still used by {user}")
                frontier.append(user)
        for dead in reversed(list(dict.fromkeys(doomed))):
            if not dead.users:
                graph.erase_node(dead)
    if isinstance(graph._codegen, _PyTreeCodeGen):
        # Concrete args made fx wrap forward in pytree (un)flattening; the graph
        # now takes plain tensors again, so restore the plain code generator.
        out_spec = graph._codegen.pytree_info.out_spec
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        flat = list(output.args[0])
        output.args = (pytree.tree_unflatten(flat, out_spec) if out_spec is not None else flat,)
        graph._codegen = CodeGen()


def _leaf_function(fn: Any) -> Any:
    """``fn`` recorded as one call_function node when it receives a Proxy."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        proxy = next((a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)), None)
        if proxy is None:
            return fn(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", fn, args, kwargs)

    return wrapper


@contextmanager
def _tracing_environment() -> Iterator[None]:
    """MHA fast path off (its checks branch on tensors) and private helpers wrapped."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    originals = [(module, name, getattr(module, name)) for module, name in _PRIVATE_NOTRACE]
    torch.backends.mha.set_fastpath_enabled(False)
    for module, name, fn in originals:
        setattr(module, name, _leaf_function(fn))
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
        for module, name, fn in originals:
            setattr(module, name, fn)


@dataclass
class FxTrace:
    gm: fx.GraphModule
    opaque: list[OpaqueModule]
    shape_decisions: list[str]  # 'file.py:line -> True' for each branch specialised


def fx_trace(model: nn.Module, inputs: tuple[Any, ...]) -> FxTrace:
    """Trace ``model`` with fx, making failing submodules leaves (see module doc)."""
    autowrap = _timm_notrace_functions()
    n_inputs = len(inputs)
    concrete = defaulted_inputs(model, n_inputs)
    modules = dict(model.named_modules())
    opaque: list[OpaqueModule] = []
    leaf_paths: set[str] = set()
    with _tracing_environment():
        for _ in range(_MAX_FALLBACKS):
            tracer = _Tracer(_ALWAYS_LEAF, leaf_paths, autowrap, ShapeBranches(model, inputs))
            try:
                graph = tracer.trace(model, concrete_args=concrete or None)
                break
            except Exception as error:
                path = tracer.failed_path
                if not path or path in leaf_paths:
                    raise FxTraceFailure(trace_failure(error)) from error
                leaf_paths.add(path)
                opaque = [o for o in opaque if not o.path.startswith(path + ".")]
                opaque.append(OpaqueModule(path, type(modules[path]).__name__, trace_failure(error)))
        else:
            raise FxTraceFailure(f"more than {_MAX_FALLBACKS} submodules failed to trace")
    _drop_specialised_inputs(graph, n_inputs)
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    gm.graph.lint()
    gm.recompile()
    opaque += [OpaqueModule(*entry) for entry in hidden_attention(gm, inputs, modules)]
    return FxTrace(gm, opaque, tracer.branches.decisions)
