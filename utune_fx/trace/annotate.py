"""Annotate every node of a traced graph with scope, shapes and op kind.

    before:  %qkv = call_module[target=blocks.0.attn.qkv](args=(%norm1,))
    after:   %qkv.meta["utune"] = NodeInfo(op_kind='linear', op_name='Linear',
                 scope='blocks.0.attn.qkv', scope_stack=(('blocks', '...Sequential'),
                 ('blocks.0', '...Block'), ('blocks.0.attn', '...Attention'),
                 ('blocks.0.attn.qkv', '...Linear')), shape=(1, 197, 576), dtype='float32')

Shapes come from one propagation of the example inputs through the graph on the
meta device, computing nothing (:mod:`.shape_propagation`, with fake-tensor and
real-forward fallbacks);
scopes from the module stack the front end recorded; kinds from
:mod:`.opkinds`, :mod:`.composites` (written-out GELU, SiLU, RMSNorm) and
:mod:`.attention`. Both front ends (fx and torch.export)
end here, so rules see the same annotations whichever traced the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from utune_fx.trace import opkinds
from utune_fx.trace.attention import AttentionInfo, find_softmax_attention, fused_attention_info
from utune_fx.trace.composites import find_composites
from utune_fx.trace.shape_propagation import Shape, propagate_shapes

META_KEY = "utune"
SHAPES_KEY = "utune_shapes_by"  # gm.meta: (method, why cheaper methods failed or None)


@dataclass
class NodeInfo:
    op_kind: str
    op_name: str
    scope: str  # innermost module path, '' for the model itself
    scope_stack: tuple[tuple[str, str], ...]  # (path, class qualname), outermost first
    shape: Shape | None = None  # for a node that returns one tensor
    dtype: str | None = None
    item_shapes: tuple[Shape | None, ...] = ()  # for a node that returns a tuple/list
    attention: AttentionInfo | None = None
    part_of: str | None = None  # name of the attention or composite node this node belongs to
    composite: str | None = None  # form of a written-out op ('gelu_tanh', 'rms_norm'); its parts point here

    @property
    def scope_class(self) -> str:
        """Short class name of the innermost module ('' at the root)."""
        return self.scope_stack[-1][1].rsplit(".", 1)[-1] if self.scope_stack else ""


def node_info(node: fx.Node) -> NodeInfo:
    try:
        return node.meta[META_KEY]
    except KeyError:
        raise KeyError(f"node {node.name} has no utune_fx annotation; trace the model with utune_fx.trace") from None


def composite_input(node: fx.Node) -> fx.Node | None:
    """The tensor a written-out act or norm reads (what its parts read from outside, not a
    parameter), so walks over data edges see one op; None for any other node."""
    own = node.meta.get(META_KEY)
    if own is None or own.composite is None:
        return None
    inputs, parts, seen, frontier = [], 0, {node}, [node]
    while frontier:
        for arg in frontier.pop().all_input_nodes:
            info = arg.meta.get(META_KEY)
            if arg in seen or info is None:
                continue
            seen.add(arg)
            if info.part_of == node.name:
                parts += 1
                frontier.append(arg)
            elif info.op_kind not in ("param", "constant") and info.shape is not None:
                inputs.append(arg)
    return inputs[0] if parts and len(inputs) == 1 else None


def class_qualname(cls: type | str) -> str:
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def _stack_from_path(path: str, modules: dict[str, torch.nn.Module]) -> tuple[tuple[str, str], ...]:
    parts = path.split(".") if path else []
    stack = []
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix in modules:
            stack.append((prefix, class_qualname(type(modules[prefix]))))
    return tuple(stack)


def _scope_stack(node: fx.Node, modules: dict[str, torch.nn.Module]) -> tuple[tuple[str, str], ...]:
    if node.op == "get_attr":
        return _stack_from_path(str(node.target).rpartition(".")[0], modules)
    recorded = node.meta.get("nn_module_stack")
    if not recorded:
        return ()
    # fx records (path, type); torch.export (path, 'module.Class') and the root as ''.
    return tuple((path, class_qualname(cls)) for path, cls in recorded.values() if path)


def _op_name(node: fx.Node, module: torch.nn.Module | None) -> str:
    name = opkinds.op_name(node, module)
    if name == "getattr" and len(node.args) > 1 and node.args[1] in ("T", "mT", "H", "mH"):
        return "t"  # x.T is a transpose, not shape metadata
    return name


def set_training(module: torch.nn.Module, mode: bool) -> None:
    """module.train(mode) without calling train(), which torch.export's modules refuse."""
    for sub in module.modules():
        sub.training = mode


def annotate(gm: fx.GraphModule, example_inputs: Sequence[Any], shapes_by: str = "meta") -> fx.GraphModule:
    """Attach a :class:`NodeInfo` to every node of ``gm`` (in place). Shapes come from
    :func:`.shape_propagation.propagate_shapes` starting at ``shapes_by`` ('meta', 'fake' or
    'forward'); ``gm.meta[SHAPES_KEY]`` says which method produced them and why cheaper ones failed."""
    propagation = propagate_shapes(gm, example_inputs, shapes_by)
    gm.meta[SHAPES_KEY] = (propagation.method, propagation.fallback_reason)
    shapes = propagation.shapes
    modules = dict(gm.named_modules())
    kinds: dict[fx.Node, str] = {}
    names: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        names[node] = _op_name(node, module)
        kinds[node] = opkinds.base_kind(node, module, names[node])
    for node in gm.graph.nodes:
        kinds[node] = opkinds.refine_linear(node, kinds) or kinds[node]

    composites = find_composites(gm, names, shapes)
    part_of = {part.name: out.name for out, found in composites.items() for part in found.parts}
    for out, found in composites.items():
        kinds[out], names[out] = found.kind, found.form
        for part in found.parts:  # steps of the formula: only the output is the act / norm
            kinds[part] = "arith"

    attention = {node: fused_attention_info(node) for node in gm.graph.nodes if kinds[node] == "attention"}
    written_out = find_softmax_attention(gm.graph, kinds)
    attention.update(written_out)
    part_of.update((part, out.name) for out, info in written_out.items() for part in info.parts)
    for node in written_out:
        kinds[node] = "attention"

    for node in gm.graph.nodes:
        stack = _scope_stack(node, modules)
        shape, dtype, item_shapes = shapes.get(node, (None, None, ()))
        node.meta[META_KEY] = NodeInfo(
            op_kind=kinds[node],
            op_name=names[node],
            scope=stack[-1][0] if stack else "",
            scope_stack=stack,
            shape=shape,
            dtype=dtype,
            item_shapes=item_shapes,
            attention=attention.get(node),
            part_of=part_of.get(node.name),
            composite=composites[node].form if node in composites else None,
        )
    return gm
