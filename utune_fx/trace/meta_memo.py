"""Repeated blocks cost one meta run: an op's output metadata memoised by everything the op can see.

    block 0:     linear(x: meta[1,197,768] f32, Linear(768 -> 2304)) -> meta kernel runs -> meta[1,197,2304]
    blocks 1-11: the same key -> a fresh empty meta tensor [1,197,2304] (same strides, dtype); no kernel

On the meta device an op's output depends only on what its key holds: the op, the metadata of
its tensor arguments (shape, strides, dtype), its other arguments by value and, for a torch.nn
leaf module, its class, its parameters' and buffers' metadata and its plain attributes
(``in_features``, ``eps``, ...). Only ops whose behaviour is fixed by that are memoised: torch
functions, Python operators and math, tensor methods, and torch.nn leaf modules; never a model's
own function or module, an in-place op, a call with ``out=``, or a value the key cannot hold
(then the op simply runs). Outputs are rebuilt fresh on every hit, so nothing aliases.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable
from typing import Any

import torch
from torch import fx, nn

_LIBRARY_MODULES = ("torch", "operator", "_operator", "math", "builtins")
_IN_PLACE_OPERATORS = frozenset(
    {operator.setitem, operator.delitem}
    | {getattr(operator, f"i{name}") for name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow")}
    | {getattr(operator, f"i{name}") for name in ("and", "or", "xor", "lshift", "rshift", "matmul")}
)
_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)
MISS = object()


class _Unkeyable(Exception):
    """A value the memo key cannot hold."""


def _key_of(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta":
            raise _Unkeyable
        return ("T", tuple(value.shape), value.stride(), value.storage_offset(), value.dtype)
    if isinstance(value, _SCALARS):
        return (type(value), value)
    if isinstance(value, (tuple, list)):  # torch.Size too
        return (type(value), tuple(_key_of(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _key_of(v)) for k, v in sorted(value.items())))
    if isinstance(value, slice):
        return ("slice", _key_of(value.start), _key_of(value.stop), _key_of(value.step))
    if value is Ellipsis:
        return ("...",)
    raise _Unkeyable


def _memoisable_function(target: Any) -> bool:
    if target in _IN_PLACE_OPERATORS:
        return False
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return not target._schema.is_mutable if isinstance(target, torch._ops.OpOverload) else False
    name = getattr(target, "__name__", "")
    home = (getattr(target, "__module__", None) or "").split(".")[0]
    return home in _LIBRARY_MODULES and not (name.endswith("_") and not name.endswith("__"))


def _module_key(module: nn.Module) -> Hashable:
    """A torch.nn leaf module by class, tensors' metadata and plain attributes."""
    if not type(module).__module__.startswith("torch.nn") or any(True for _ in module.children()):
        raise _Unkeyable
    tensors = tuple(
        (name, tuple(t.shape), t.dtype) if t is not None else (name, None)
        for name, t in [*module._parameters.items(), *module._buffers.items()]
    )
    plain = tuple(
        (name, _key_of(value))
        for name, value in sorted(vars(module).items())
        if not name.startswith("_") and not isinstance(value, torch.Tensor)
    )
    return (type(module), tensors, plain)


class OutputMemo:
    """Output metadata by op key; ``lookup`` gives MISS or a fresh value."""

    def __init__(self) -> None:
        self._outputs: dict[Hashable, Any] = {}

    def key(self, node: fx.Node, module: nn.Module | None, args: tuple, kwargs: dict) -> Hashable | None:
        if "out" in kwargs:
            return None
        try:
            if node.op == "call_function":
                if not _memoisable_function(node.target):
                    return None
                op = node.target
            elif node.op == "call_method":
                if str(node.target).endswith("_") and not str(node.target).endswith("__"):
                    return None
                op = ("method", node.target)
            elif node.op == "call_module" and module is not None:
                op = _module_key(module)
            else:
                return None
            return (op, _key_of(args), _key_of(kwargs))
        except (_Unkeyable, TypeError):  # TypeError: an unhashable value inside
            return None

    def lookup(self, key: Hashable) -> Any:
        spec = self._outputs.get(key, MISS)
        return MISS if spec is MISS else _rebuild(spec)

    def store(self, key: Hashable, value: Any) -> None:
        spec = _spec(value)
        if spec is not MISS:
            self._outputs[key] = spec


def _spec(value: Any) -> Any:
    """What rebuilds ``value``: a tensor's metadata, containers of them, or an immutable value as is."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta" or value.storage_offset() != 0 or type(value) is not torch.Tensor:
            return MISS
        return ("T", tuple(value.shape), value.stride(), value.dtype)
    if isinstance(value, (int, float, bool, type(None), torch.Size)):
        return ("V", value)
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
        items = [_spec(v) for v in value]
        return MISS if any(item is MISS for item in items) else (type(value), items)
    return MISS


def _rebuild(spec: Any) -> Any:
    kind = spec[0]
    if kind == "T":
        return torch.empty_strided(spec[1], spec[2], dtype=spec[3], device="meta")
    if kind == "V":
        return spec[1]
    return kind(_rebuild(item) for item in spec[1])
