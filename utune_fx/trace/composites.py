"""Find activations, RMSNorm and LayerNorm written out as arithmetic and give them one op kind.

Models that spell GELU, SiLU, RMSNorm or LayerNorm with elementary ops (GPT-2's ``gelu_new``,
CLIP's quick GELU, every Hugging Face RMSNorm, DeBERTa's and Cohere's LayerNorm) would otherwise
show rules a tangle of mul, add and tanh nodes; the normaliser makes them look like ``F.gelu``,
``F.rms_norm`` or ``F.layer_norm``:

    before:  a = mul(x, 0.5)   p = pow(x, 3.0)   b = add(x, mul(p, 0.044715))
             t = tanh(mul(b, 0.7978845608))      g = mul(a, add(t, 1.0))
    after:   g                 kind act,  op_name gelu_tanh, composite gelu_tanh
             a, p, b, t, ...   kind arith, part_of = g

    before:  v = mean(pow(x, 2), [-1], keepdim)  n = mul(x, rsqrt(add(v, 1e-6)))  y = mul(w, n)
    after:   y                 kind norm, op_name rms_norm; the rest are its parts
    (x - mean) / sqrt(var + eps) * w + b, the variance a mean of squares -> kind norm, layer_norm

How a candidate is found (structure): an input ``x`` read at least twice by elementwise
ops, and a node ``y`` computed only from ``x``, scalars and parameters through elementwise
ops, casts and reductions, whose inner nodes are read by nothing else. Which op it is
(function): the subgraph runs once on a float64 probe and is compared with the references
below, so any spelling of the same formula is recognised and near-misses are not:
``x * sigmoid(y)`` (a gate: two inputs), ``x * sigmoid(2 x)``, a mean of squares over
another axis, a mean without the square. Casts count as identity in the probe. A weight on
the meta device (a model built there) has no values and reads as ones in the probe.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

_ELEMENTWISE = frozenset(
    {
        "add",
        "sub",
        "rsub",
        "mul",
        "div",
        "neg",
        "pow",
        "sqrt",
        "rsqrt",
        "exp",
        "erf",
        "tanh",
        "sigmoid",
        "reciprocal",
        "square",
        # piecewise forms (xIELU: where(x > 0, a x^2 + b x, (expm1(min(x, eps)) - x) a' + b x))
        "where",
        "gt",
        "lt",
        "expm1",
        "minimum",
        "maximum",
        "min",  # torch.min(x, other): elementwise (a reduction's tuple fails the probe)
        "max",
    }
)
_CASTS = frozenset({"to", "type", "type_as", "float", "half", "bfloat16", "double", "_to_copy"})
_REDUCTIONS = frozenset({"mean", "sum"})
_MAX_PARTS = 32  # the longest written-out form seen (a cast RMSNorm) has under 12 nodes

# Activations by their closed forms; a written-out one agrees within _ACT_ATOL on the probe
# (written-out constants such as 0.7978845608 are good to 1e-10; the tanh GELU is 5e-4 from erf's).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
}
_ACT_ATOL = 1e-5
_NORM_RTOL = 1e-5  # the probe's rms is ~100, so any eps below ~1 moves it by less
_ROWS = 3  # the norm probe's size along every axis but the last (at most x's)


@dataclass(frozen=True)
class Composite:
    """A written-out op: its kind ('act' or 'norm'), form ('gelu_tanh', 'rms_norm', ...),
    the tensor it reads and the nodes that compute it (output excluded)."""

    kind: str
    form: str
    input: fx.Node
    parts: tuple[fx.Node, ...]


def _spelling(node: fx.Node, gm: fx.GraphModule, names: dict[fx.Node, str]) -> str:
    if node.op == "call_module":  # nn.Sigmoid, nn.Tanh: parameter-free modules only
        module = gm.get_submodule(str(node.target))
        return names[node].lower() if not any(True for _ in module.parameters()) else ""
    return names[node] if node.op in ("call_function", "call_method") else ""


def _static_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed from parameters and constants only (no graph input reaches them)."""
    static: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" or (
            node.op != "placeholder" and node.all_input_nodes and all(i in static for i in node.all_input_nodes)
        ):
            static.add(node)
    return static


class _Finder:
    def __init__(self, gm: fx.GraphModule, names: dict[fx.Node, str], shapes: dict[fx.Node, tuple]):
        self.gm = gm
        self.shapes = shapes
        self.order = {node: i for i, node in enumerate(gm.graph.nodes)}
        self.spelling = {node: _spelling(node, gm, names) for node in gm.graph.nodes}
        self.static = _static_nodes(gm.graph)
        self.taken: set[fx.Node] = set()

    def allowed(self, node: fx.Node) -> bool:
        return self.spelling[node] in _ELEMENTWISE | _CASTS | _REDUCTIONS and node not in self.taken

    def readers(self, node: fx.Node) -> list[fx.Node]:
        """Users that compute a tensor from ``node`` (not torch.export's metadata asserts)."""
        return [u for u in node.users if self.shapes.get(u, (None,))[0] is not None]

    def closure(self, x: fx.Node) -> list[fx.Node]:
        """Nodes after ``x`` computed from x, scalars and parameters by allowed ops, in graph order."""
        members, found = {x}, []
        heap = [(self.order[u], u) for u in x.users]
        heapq.heapify(heap)
        while heap and len(found) < _MAX_PARTS:
            _, node = heapq.heappop(heap)
            if node in members or not self.allowed(node):
                continue
            if all(i in members or i in self.static for i in node.all_input_nodes):
                members.add(node)
                found.append(node)
                for user in node.users:
                    heapq.heappush(heap, (self.order[user], user))
        return found

    def subgraph(self, x: fx.Node, out: fx.Node, members: set[fx.Node]) -> list[fx.Node] | None:
        """``out`` and what computes it from ``x`` (static helpers such as ``1 + w.float()``
        included), in graph order; None if an inner node is read outside it."""
        nodes, frontier = {out}, [out]
        while frontier:
            for arg in frontier.pop().all_input_nodes:
                inner = arg in members or (arg in self.static and arg.op != "get_attr")
                if inner and arg not in nodes:
                    nodes.add(arg)
                    frontier.append(arg)
        if any(u not in nodes for n in nodes if n is not out for u in self.readers(n)):
            return None
        return sorted(nodes, key=self.order.__getitem__)

    def find(self) -> dict[fx.Node, Composite]:
        found: dict[fx.Node, Composite] = {}
        for x in self.gm.graph.nodes:
            reads = sum(1 for u in x.users for a in u.all_input_nodes if a is x and self.allowed(u))
            if reads < 2 or x in self.static or x in self.taken or self.shapes.get(x, (None,))[0] is None:
                continue
            closure = self.closure(x)
            members = set(closure)
            for out in reversed(closure):
                nodes = self.subgraph(x, out, members)
                if nodes is None or sum(a is x for n in nodes for a in n.all_input_nodes) < 2:
                    continue
                recognised = self.recognise(x, nodes)
                if recognised is not None:
                    x, nodes = self._absorb_casts(x, nodes)
                    found[out] = Composite(recognised[0], recognised[1], x, tuple(n for n in nodes if n is not out))
                    self.taken |= set(nodes)
                    break
        return found

    def _absorb_casts(self, x: fx.Node, nodes: list[fx.Node]) -> tuple[fx.Node, list[fx.Node]]:
        """A cast read only by the composite is its own (Llama's RMSNorm starts with x.to(float32))."""
        while self.spelling[x] in _CASTS and x.all_input_nodes and all(u in nodes for u in self.readers(x)):
            nodes = [x, *nodes]
            x = x.all_input_nodes[0]
        return x, nodes

    def recognise(self, x: fx.Node, nodes: list[fx.Node]) -> tuple[str, str] | None:
        """('act', form), ('norm', 'rms_norm') or ('norm', 'layer_norm') when the subgraph computes one
        on the probe."""
        try:
            if any(self.spelling[n] in _REDUCTIONS for n in nodes):
                shape = self.shapes[x][0]
                if not shape:
                    return None
                if self._is_rms_norm(x, nodes, shape):
                    return "norm", "rms_norm"
                return ("norm", "layer_norm") if self._is_layer_norm(x, nodes, shape) else None
            probe = torch.linspace(-8.0, 8.0, 321, dtype=torch.float64)
            out = self._run(x, nodes, probe)
            if any(n.op == "get_attr" and isinstance(self._attr(n), nn.Parameter) for n in self._reads(nodes)):
                return ("act", "learnt") if _nonlinear(probe, out) else None  # xIELU, swish-beta
            for form, reference in ACTIVATIONS.items():
                if out.shape == probe.shape and torch.allclose(out, reference(probe), rtol=0, atol=_ACT_ATOL):
                    return "act", form
        except Exception:  # an op the probe cannot run (odd dtypes, shapes): not recognised
            return None
        return None

    def _is_rms_norm(self, x: fx.Node, nodes: list[fx.Node], shape: tuple[int, ...]) -> bool:
        """out = x / rms(x over the last axis) * g, one g per channel (a weight, 1 + weight, or 1),
        the same g on every row of two probes (no larger than x; a single row proves nothing alone)."""
        generator = torch.Generator().manual_seed(0)
        probe_shape = tuple(min(_ROWS, size) for size in shape[:-1]) + shape[-1:]
        gains = []
        for offset in (30.0, -50.0):
            probe = 100 * torch.randn(probe_shape, generator=generator, dtype=torch.float64) + offset
            out = self._run(x, nodes, probe)
            if out.shape != probe.shape:
                return False
            normalised = probe * probe.pow(2).mean(-1, keepdim=True).rsqrt()
            gain = (out / normalised).reshape(-1, shape[-1])[0]
            if not torch.allclose(out, normalised * gain, rtol=_NORM_RTOL, atol=0):
                return False
            gains.append(gain)
        return bool(gains[0].abs().max() > 0) and torch.allclose(gains[0], gains[1], rtol=_NORM_RTOL, atol=0)

    def _is_layer_norm(self, x: fx.Node, nodes: list[fx.Node], shape: tuple[int, ...]) -> bool:
        """out = (x - mean) / std * g + b over the last axis (biased variance), one g and b per
        channel, fitted on four probes and checked on every row (DeBERTa's and Cohere's LayerNorm)."""
        generator = torch.Generator().manual_seed(1)
        probe_shape = tuple(min(_ROWS, size) for size in shape[:-1]) + shape[-1:]
        normalised, outputs = [], []
        for offset in (30.0, -50.0, 5.0, -20.0):  # a line fits any two points: four rows at least
            probe = 100 * torch.randn(probe_shape, generator=generator, dtype=torch.float64) + offset
            out = self._run(x, nodes, probe)
            if out.shape != probe.shape:
                return False
            centred = probe - probe.mean(-1, keepdim=True)
            normalised.append((centred * centred.pow(2).mean(-1, keepdim=True).rsqrt()).reshape(-1, shape[-1]))
            outputs.append(out.reshape(-1, shape[-1]))
        n, out = torch.cat(normalised), torch.cat(outputs)
        n_mean, out_mean = n.mean(0), out.mean(0)
        gain = ((n - n_mean) * (out - out_mean)).sum(0) / (n - n_mean).pow(2).sum(0)
        bias = out_mean - gain * n_mean
        scale = out.abs().max().clamp_min(1e-12)
        return bool(gain.abs().max() > 0) and torch.allclose(out, n * gain + bias, rtol=0, atol=_NORM_RTOL * scale)

    def _reads(self, nodes: list[fx.Node]) -> set[fx.Node]:
        return {a for n in nodes for a in n.all_input_nodes}

    def _attr(self, node: fx.Node) -> object:
        target = self.gm
        for part in str(node.target).split("."):
            target = getattr(target, part)
        return target

    def _run(self, x: fx.Node, nodes: list[fx.Node], probe: torch.Tensor) -> torch.Tensor:
        """The subgraph on ``probe`` in float64, casts as identity."""
        values: dict[fx.Node, object] = {x: probe}
        for node in self._reads(nodes):
            if node.op == "get_attr":
                value = self._attr(node)
                values[node] = _probe_weight(value) if isinstance(value, torch.Tensor) else value
        for node in nodes:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
            if self.spelling[node] in _CASTS:
                values[node] = args[0]
            elif node.op == "call_module":
                values[node] = self.gm.get_submodule(str(node.target))(*args, **kwargs)
            elif node.op == "call_method":
                values[node] = getattr(args[0], str(node.target))(*args[1:], **kwargs)
            else:
                values[node] = node.target(*args, **kwargs)
        return values[nodes[-1]]


def _probe_weight(value: torch.Tensor) -> torch.Tensor:
    """A weight as the probe reads it, in float64; a weight on the meta device has no values (a
    model built there to be traced without memory), so it reads as ones: the formula is checked,
    not the weights."""
    if value.device.type == "meta":
        return torch.ones(value.shape, dtype=torch.float64)
    return value.detach().double()


def _nonlinear(probe: torch.Tensor, out: torch.Tensor) -> bool:
    """One output per input, and no line a * x + b through them (a learnt scale is no activation)."""
    if out.shape != probe.shape or not torch.isfinite(out).all():
        return False
    design = torch.stack([probe, torch.ones_like(probe)], dim=1)
    fitted = design @ torch.linalg.lstsq(design, out.unsqueeze(1)).solution
    return bool((out - fitted.squeeze(1)).abs().max() > 1e-6 * (1 + out.abs().max()))


def find_composites(
    gm: fx.GraphModule, names: dict[fx.Node, str], shapes: dict[fx.Node, tuple]
) -> dict[fx.Node, Composite]:
    """Output node of every written-out GELU, SiLU, quick GELU and RMSNorm in ``gm``.
    ``names``: each node's op name; ``shapes``: (shape, dtype, item shapes) per node."""
    with torch.no_grad():
        return _Finder(gm, names, shapes).find()
