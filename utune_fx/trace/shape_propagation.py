"""Shapes and dtypes of every node of a traced graph, without computing anything.

    before:  one forward pass of the example inputs through the graph (real weights, real memory:
             0.25 s of ViT-B/16's 0.35 s trace, and no way to trace a model larger than memory)
    after:   the graph runs on the *meta* device: every tensor (inputs, parameters, buffers,
             constants) is replaced by an empty meta tensor of the same shape, dtype and strides,
             leaf modules by shallow copies holding such tensors; each op computes only its output's
             metadata. No weight is read or written, nothing is allocated, the model is untouched.

    repeated blocks: an op seen before with the same inputs' metadata is not run again (meta_memo.py)

    propagate_shapes(gm, inputs) -> ShapePropagation(shapes={node: (shape, dtype, item_shapes)},
                                                     method='meta', fallback_reason=None)

Where an op cannot run on meta tensors (a leaf module that branches on tensor values, ``.item()``,
an op without a meta kernel, a tensor pinned to the CPU by the model's code), the graph runs again
under torch's FakeTensorMode (fake tensors on the inputs' own devices; same metadata-only kernels,
but device-correct), and if that fails too, as a real forward pass in eval mode without gradients,
as before. ``method`` says which produced the shapes ('meta', 'fake' or 'forward'),
``fallback_reason`` why the cheaper ones were not used; the trace report carries both. A model
built on the meta device has nothing to run for real: its "forward" is meta propagation too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree

from utune_fx.errors import first_line
from utune_fx.trace.meta_memo import MISS, OutputMemo
from utune_fx.trace.modes import eval_mode

Shape = tuple[int, ...]
NodeShapes = tuple[Shape | None, str | None, tuple[Shape | None, ...]]
METHODS = ("meta", "fake", "forward")


@dataclass
class ShapePropagation:
    shapes: dict[fx.Node, NodeShapes]
    method: str  # 'meta', 'fake' or 'forward' (see module doc)
    fallback_reason: str | None = None  # why meta (and fake) propagation failed, when they did


def node_shapes(value: object) -> NodeShapes:
    """(shape, dtype, item shapes) of a node's value: one tensor, or a tuple/list holding tensors."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), str(value.dtype).removeprefix("torch."), ()
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return None, None, tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in value)
    return None, None, ()


class MetaShadow:
    """Meta-device stand-ins for a model's tensors and modules, made once per run and memoised.

    A tensor becomes an empty meta tensor of its shape, strides and dtype (a Parameter stays a
    Parameter; the original is not even read by an op); a
    module a shallow copy of itself whose parameters, buffers, tensor attributes and submodules are
    stand-ins, in eval mode. The originals are never modified."""

    def __init__(self) -> None:
        self._tensors: dict[int, torch.Tensor] = {}
        self._modules: dict[int, nn.Module] = {}

    def tensor(self, value: torch.Tensor) -> torch.Tensor:
        if value.device.type == "meta":
            return value
        key = id(value)
        if key not in self._tensors:
            meta = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
            if isinstance(value, nn.Parameter):
                meta = nn.Parameter(meta, requires_grad=False)
            self._tensors[key] = meta
        return self._tensors[key]

    def value(self, value: Any) -> Any:
        """Every tensor in a (possibly nested) value replaced by its stand-in."""
        return pytree.tree_map_only(torch.Tensor, self.tensor, value)

    def module(self, module: nn.Module) -> nn.Module:
        key = id(module)
        if key not in self._modules:
            clone = type(module).__new__(type(module))
            state = dict(module.__dict__)
            for name, attribute in state.items():
                if isinstance(attribute, torch.Tensor):
                    state[name] = self.tensor(attribute)
            state["_parameters"] = {n: None if p is None else self.tensor(p) for n, p in module._parameters.items()}
            state["_buffers"] = {n: None if b is None else self.tensor(b) for n, b in module._buffers.items()}
            state["_modules"] = {n: None if m is None else self.module(m) for n, m in module._modules.items()}
            state["training"] = False
            clone.__dict__.update(state)
            self._modules[key] = clone
        return self._modules[key]


class MetaInterpreter(fx.Interpreter):
    """An fx.Interpreter that, given a :class:`MetaShadow`, reads the graph's attributes and calls
    its leaf modules through meta stand-ins (run it under ``torch.device('meta')`` on stand-in
    inputs); without one, it is a plain interpreter."""

    def __init__(self, gm: fx.GraphModule, shadow: MetaShadow | None = None):
        super().__init__(gm)
        self.shadow = shadow

    def fetch_attr(self, target: str) -> Any:
        value = super().fetch_attr(target)
        if self.shadow is None:
            return value
        return self.shadow.module(value) if isinstance(value, nn.Module) else self.shadow.value(value)

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if self.shadow is None:
            return super().call_module(target, args, kwargs)
        return self.shadow.module(self.module.get_submodule(str(target)))(*args, **kwargs)

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if self.shadow is not None:
            args, kwargs = _on_meta_device(args, kwargs)
        return super().call_function(target, args, kwargs)

    def call_method(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if self.shadow is not None:
            if target in _DEVICE_METHODS:  # x.cpu(), x.cuda(): stays on meta
                return args[0]
            args, kwargs = _on_meta_device(args, kwargs)
            if target == "to" and len(args) > 1 and isinstance(args[1], str) and _is_device_name(args[1]):
                args = (args[0], _META, *args[2:])  # x.to('cpu')
        return super().call_method(target, args, kwargs)


_DEVICE_METHODS = frozenset({"cpu", "cuda", "pin_memory"})
_META = torch.device("meta")


def _on_meta_device(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Devices the graph names (torch.export writes ``device=cpu`` into every factory call and
    ``.to``; models write ``x.to('cuda')``) become the meta device, so no tensor leaves it."""
    args, kwargs = pytree.tree_map_only(torch.device, lambda _: _META, (args, kwargs))
    if isinstance(kwargs.get("device"), str):
        kwargs = {**kwargs, "device": _META}
    return args, kwargs


def _is_device_name(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        return False
    return True


class _Recorder(MetaInterpreter):
    """Runs the graph once and keeps (shape, dtype, item shapes) of every node's value; on the meta
    device, an op seen before with the same inputs' metadata is not run again (:mod:`.meta_memo`)."""

    def __init__(self, gm: fx.GraphModule, shadow: MetaShadow | None = None):
        super().__init__(gm, shadow)
        self.shapes: dict[fx.Node, NodeShapes] = {}
        self.memo = OutputMemo() if shadow is not None else None

    def run_node(self, n: fx.Node) -> Any:
        key = None
        if self.memo is not None and n.op in ("call_function", "call_method", "call_module"):
            with self._set_current_node(n):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                module = self.module.get_submodule(str(n.target)) if n.op == "call_module" else None
                key = self.memo.key(n, module, args, kwargs)
                result = self.memo.lookup(key) if key is not None else MISS
                if result is MISS:
                    result = getattr(self, n.op)(n.target, args, kwargs)
                    if key is not None:
                        self.memo.store(key, result)
        else:
            result = super().run_node(n)
        self.shapes[n] = node_shapes(result)
        return result


def _on_meta(gm: fx.GraphModule, inputs: Sequence[Any]) -> dict[fx.Node, NodeShapes]:
    shadow = MetaShadow()
    recorder = _Recorder(gm, shadow)
    with torch.no_grad(), torch.device("meta"):  # tensors the graph creates land on meta too
        recorder.run(*shadow.value(tuple(inputs)))
    return recorder.shapes


def _on_fake(gm: fx.GraphModule, inputs: Sequence[Any]) -> dict[fx.Node, NodeShapes]:
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # parameters are converted as ops read them
    recorder = _Recorder(gm)
    fake_inputs = pytree.tree_map_only(torch.Tensor, mode.from_tensor, tuple(inputs))
    with torch.no_grad(), eval_mode(gm), mode:
        recorder.run(*fake_inputs)
    return recorder.shapes


def _forward(gm: fx.GraphModule, inputs: Sequence[Any]) -> dict[fx.Node, NodeShapes]:
    recorder = _Recorder(gm)
    with torch.no_grad(), eval_mode(gm):
        recorder.run(*inputs)
    return recorder.shapes


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any], method: str = "meta") -> ShapePropagation:
    """Shapes of every node for ``example_inputs``: by ``method`` ('meta', 'fake' or 'forward'),
    falling back to the next one when it fails. The error of the last one tried is raised."""
    reasons = []
    for name in METHODS[METHODS.index(method) :]:
        runner = {"meta": _on_meta, "fake": _on_fake, "forward": _forward}[name]
        try:
            shapes = runner(gm, example_inputs)
        except Exception as error:
            if name == METHODS[-1]:
                raise
            reasons.append(f"{name}: {first_line(error)}")
            continue
        return ShapePropagation(shapes, name, "; ".join(reasons) or None)
    raise AssertionError("unreachable")  # the last method raises or returns
