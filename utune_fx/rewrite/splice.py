"""Regional rewriting: move the tuners of a rewritten whole-model graph into the user's own model.

    graph (traced, rewritten):  %y = call c_attn(%x); %u = call utune.lora.0(%x); %y2 = add(%y, %u)
    user's model, spliced:      model.utune.lora.0 is that tuner; c_attn has a forward hook:
                                    output = output + utune.lora.0(<c_attn's input>)

The graph says what each tuner reads (a node x) and where it adds (a node y). A splice finds the
modules of the model whose calls carry those tensors: y must be the output of a module (or the
first item of the tuple it returns: Hugging Face attentions return (output, weights)); x the input
or the output of the same module or of one called before it ends. Both sides run once on the
example inputs and values are compared, so a splice never relies on names alone. The model keeps
its class, forward, keyword inputs, caches and any input length: only the hooked modules' outputs
change. A tuner whose tensors are not at module boundaries (prompts, prefix keys, reshaped sites)
cannot be spliced, and ``splice_plan`` says which and why.

Hooks are callable objects (not closures), so ``copy.deepcopy`` and pickling of the model keep
each hook pointing at the copied tuner.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from utune_fx.rewrite.attention_sites import TUNER_META
from utune_fx.trace import node_info
from utune_fx.trace.modes import eval_mode

_CLOSE = {"rtol": 1e-4, "atol": 1e-5}  # the graph and the eager model run the same kernels


@dataclass(frozen=True)
class Endpoint:
    """A tensor at a module boundary: an input (positional index or keyword) or the output."""

    module: str
    side: str  # "input" or "output"
    key: int | str | None = None  # input: index or keyword; output: None (a tensor) or 0 (first item)

    def describe(self) -> str:
        where = f"[{self.key!r}]" if self.key is not None else ""
        return f"{self.module or 'model'}.{self.side}{where}"


@dataclass
class Splice:
    tuner: str  # module path of the tuner (utune.<rule>.<index>)
    reads: Endpoint
    writes: Endpoint
    reshape: bool  # the tuner's output takes the written tensor's view


@dataclass
class _Call:
    start: int
    end: int = -1
    inputs: dict | None = None
    output: Any = None


class _Carry:
    """Tensors read by one module's hook and used by another's, within one forward."""

    def __init__(self):
        self.values: dict[str, torch.Tensor] = {}


class _Keep:
    """Hook that keeps an endpoint's tensor for a later module's tuner."""

    def __init__(self, carry: _Carry, endpoint: Endpoint, name: str):
        self.carry, self.endpoint, self.name = carry, endpoint, name

    def __call__(self, module, args, kwargs, output=None):
        value = output if self.endpoint.side == "output" else None
        self.carry.values[self.name] = _pick(self.endpoint, args, kwargs, value)


class _AddTuner:
    """Forward hook: the module's output (or its first item) plus the tuner's update."""

    def __init__(self, tuner: nn.Module, splice: Splice, carry: _Carry):
        self.tuner, self.splice, self.carry = tuner, splice, carry

    def __call__(self, module, args, kwargs, output):
        reads, writes = self.splice.reads, self.splice.writes
        if reads.module == writes.module:
            x = _pick(reads, args, kwargs, output)
        else:
            x = self.carry.values.pop(self.splice.tuner, None)
            if x is None:
                raise RuntimeError(
                    f"{self.splice.tuner}: {reads.describe()} was not computed before {writes.describe()} "
                    "in this forward; the tuner reads a module that did not run"
                )
        first = output if writes.key is None else output[0]
        update = self.tuner(x)
        if self.splice.reshape:
            update = update.reshape_as(first)
        total = first + update
        return total if writes.key is None else type(output)((total, *output[1:]))


def _pick(endpoint: Endpoint, args: tuple, kwargs: dict, output: Any) -> Any:
    if endpoint.side == "output":
        return output if endpoint.key is None else output[0]
    return args[endpoint.key] if isinstance(endpoint.key, int) else kwargs[endpoint.key]


def _tensors_in(args: tuple, kwargs: dict) -> dict:
    found = {i: a for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    return found | {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}


def _first_output(output: Any) -> tuple[int | None, torch.Tensor | None]:
    if isinstance(output, torch.Tensor):
        return None, output
    if type(output) in (tuple, list) and output and isinstance(output[0], torch.Tensor):
        return 0, output[0]
    return None, None


def _ancestors(scope: str) -> list[str]:
    """'a.b.c' -> ['a.b.c', 'a.b', 'a'] (deepest first; the model itself is never a site)."""
    parts = scope.split(".") if scope else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _tuner_calls(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node, bool] | fx.Node]:
    """Each tuner call as (call, what it reads, what it adds to, reshaped), or the bare call node
    when it is wired in another way (prompts, prefix keys)."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or TUNER_META not in node.meta or not str(node.target).startswith("utune."):
            continue
        update, users = node, list(node.users)
        reshape = len(users) == 1 and users[0].op == "call_method" and users[0].target == "reshape_as"
        if reshape:
            update, users = users[0], list(users[0].users)
        adds = [u for u in users if u.op == "call_function" and u.target is operator.add and u.args[1] is update]
        if len(node.args) != 1 or node.kwargs or len(users) != 1 or len(adds) != 1:
            found.append(node)
            continue
        writes = adds[0].args[0]
        while TUNER_META in writes.meta and writes.op == "call_function" and writes.target is operator.add:
            writes = writes.args[0]  # another tuner's sum on the same output: the output itself
        found.append((node, node.args[0], writes, reshape))
    return found


def _graph_values(gm: fx.GraphModule, inputs: tuple, wanted: set[fx.Node]) -> dict[fx.Node, Any]:
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n in wanted:
                values[n] = result
            return result

    with torch.no_grad(), eval_mode(gm):
        Recorder(gm).run(*inputs)
    return values


def _eager_calls(model: nn.Module, inputs: tuple, paths: set[str]) -> dict[str, list[_Call]]:
    """Every call of the named modules in one eager run: inputs, output, start and end order."""
    calls: dict[str, list[_Call]] = {p: [] for p in paths}
    clock = [0]
    handles = []

    def tick() -> int:
        clock[0] += 1
        return clock[0]

    for path in paths:
        module = model.get_submodule(path)

        def pre(module, args, kwargs, path=path):
            calls[path].append(_Call(tick(), inputs=_tensors_in(args, kwargs)))

        def post(module, args, kwargs, output, path=path):
            call = calls[path][-1]
            call.end, call.output = tick(), output

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad(), eval_mode(model):  # as the graph runs: dropout would make the values differ
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _same(a: Any, b: Any) -> bool:
    """The same tensor, also as another view of the same tokens ([B, N, C] and the [B * N, C] that
    transformers' Conv1D multiplies): tuners work on the last axis whatever the leading ones."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dtype != b.dtype:
        return False
    if a.shape != b.shape:
        if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-1] or a.numel() != b.numel():
            return False
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return torch.allclose(a.float(), b.float(), **_CLOSE)


def _find_writes(y, calls: dict[str, list[_Call]], scope: str) -> tuple[Endpoint, _Call] | None:
    for path in _ancestors(scope):  # the module computing y is its scope or an ancestor: deepest first
        if len(calls.get(path, ())) != 1:
            continue
        key, first = _first_output(calls[path][0].output)
        if _same(first, y):
            return Endpoint(path, "output", key), calls[path][0]
    return None


def _find_reads(x, calls: dict[str, list[_Call]], writes: Endpoint, ends: int) -> Endpoint | None:
    """Where the tuner's input is in the eager model, preferring modules that run whenever the written
    one does: its own input (LoRA), its output (a sequential tuner), an enclosing module's input (the
    attention's or the FFN's for a parallel tuner), and only then another module called before it."""
    own = calls[writes.module][0]
    for key, value in (own.inputs or {}).items():
        if _same(value, x):
            return Endpoint(writes.module, "input", key)
    if _same(_pick(writes, (), {}, own.output), x):
        return writes
    enclosing = [p for p in _ancestors(writes.module)[1:] if len(calls.get(p, ())) == 1]
    others = sorted((p for p in calls if p not in enclosing and p != writes.module), key=len, reverse=True)
    for path in enclosing + others:
        if len(calls[path]) != 1:
            continue
        call = calls[path][0]
        for name, value in (call.inputs or {}).items():
            if call.start < ends and _same(value, x):
                return Endpoint(path, "input", name)
        key, first = _first_output(call.output)
        if path not in enclosing and call.end < ends and _same(first, x):
            return Endpoint(path, "output", key)
    return None


def splice_plan(gm: fx.GraphModule, model: nn.Module, inputs: tuple) -> tuple[list[Splice], list[str]]:
    """(the splices of every tuner of ``gm``, why some cannot be spliced); all or nothing is spliced."""
    tuners = _tuner_calls(gm)
    refused = [
        f"{node.target}: wired into the graph beyond one module's output"
        for node in tuners
        if not isinstance(node, tuple)
    ]
    wired = [t for t in tuners if isinstance(t, tuple)]
    if refused or not wired:
        return [], refused
    modules = dict(model.named_modules())
    paths: set[str] = set()
    for _, x, y, _ in wired:
        for node in (x, y, *x.users):
            paths.update(p for p in _ancestors(node_info(node).scope) if p in modules)
    values = _graph_values(gm, inputs, {n for _, x, y, _ in wired for n in (x, y)})
    calls = _eager_calls(model, inputs, paths)
    splices = []
    for call, x, y, reshape in wired:
        found = _find_writes(values.get(y), calls, node_info(y).scope)
        if found is None:
            refused.append(f"{call.target}: the tensor it adds to ({y.name}) is no module's output")
            continue
        writes, writer = found
        reads = _find_reads(values.get(x), calls, writes, writer.end)
        if reads is None:
            refused.append(
                f"{call.target}: the tensor it reads ({x.name}) is at no module boundary before {writes.module}"
            )
            continue
        splices.append(Splice(str(call.target), reads, writes, reshape))
    return (splices if not refused else []), refused


def uninstall(model: nn.Module) -> None:
    """Remove every splice hook, found by type: handles do not survive pickling."""
    for module in model.modules():
        for hooks, extras in (
            (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
            (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
        ):
            for key in [k for k, hook in hooks.items() if isinstance(hook, (_AddTuner, _Keep))]:
                del hooks[key]
                for extra in extras:
                    extra.pop(key, None)


def install(model: nn.Module, tuners: nn.Module, splices: list[Splice]) -> None:
    """Register ``tuners`` as ``model.utune`` and hook every splice (``uninstall`` removes them)."""
    model.add_module("utune", tuners)
    carry = _Carry()
    for splice in splices:
        tuner = model.get_submodule(splice.tuner)
        if splice.reads.module != splice.writes.module:
            source = model.get_submodule(splice.reads.module)
            keep = _Keep(carry, splice.reads, splice.tuner)
            if splice.reads.side == "input":
                source.register_forward_pre_hook(keep, with_kwargs=True)
            else:
                source.register_forward_hook(keep, with_kwargs=True)
        target = model.get_submodule(splice.writes.module)
        target.register_forward_hook(_AddTuner(tuner, splice, carry), with_kwargs=True)
