"""Find the layer a tuner folds into, as an nn.Module whose weights are the graph's own.

    %y = call_module[blocks.0.mlp.fc1](%x)                  -> blocks.0.mlp.fc1 (nn.Linear)
    %y = conv2d(%x, %w, %b, [16, 16])                       -> an nn.Conv2d view (stride 16)
    %y = layer_norm(%x, (192,), weight=%w, bias=%b)         -> an nn.LayerNorm view whose
         (%w, %b = get_attr blocks.0.norm1.weight / .bias)     weight and bias ARE those parameters
    %y = addmm(%b, %x, %w)   (%w [in, out]: HF's Conv1D)     -> an nn.Linear view, weight %w.t()
    %y = addmm(%b, %x, t(%w)) (%w [out, in])                 -> an nn.Linear view, weight %w
    %y = embedding(%w, %ids)                                -> an nn.Embedding view

Tracing through timm's LayerNorm, and every graph of the torch.export front
end (aten.linear, aten.layer_norm), leaves functional calls whose weights are
get_attr nodes (or views of them: W.t()); the view lets the same merges write
to them, in the parameter's own layout. A layer folds only
when nothing else reads its weights: a module called twice (shared weights, or
replayed on prompts) would change at every call.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn

from utune_fx.match.predicates import is_weight
from utune_fx.match.sizes import conv_arguments, embedding_arguments
from utune_fx.rewrite.passes import functional_conv_geometry
from utune_fx.trace import node_info
from utune_fx.trace.opkinds import matmul_operands

_PASS_THROUGH = ("identity", "dropout")  # no-ops at inference between a layer and a tuner
_LAYOUT = ("permute", "reshape", "cast")  # between a parameter and its layer: W.t(), aten.t, a view, .to(dtype)
# functional layers folding writes through a view; "product": a linear spelled x @ W, mm(x, W) or
# addmm(b, x, W), W [in, out] (transformers' Conv1D) or W.t() of a W [out, in] (a linear decomposed)
_FUNCTIONAL_VIEWS = {
    "layer_norm": "norm",
    "linear": "linear",
    "conv1d": "conv",
    "conv2d": "conv",
    "conv3d": "conv",
    "embedding": "embedding",
    "addmm": "product",
    "mm": "product",
    "matmul": "product",
}


@dataclass
class FoldTarget:
    node: fx.Node
    layer: nn.Module | None  # None: cannot fold into it, see reason
    reason: str = ""
    can_add_bias: bool = True  # a functional view cannot grow a bias the graph does not pass


def layer_behind(node: fx.Node) -> fx.Node:
    """The node that computes ``node``, skipping inference no-ops (dropout, identity)."""
    while (
        node.op in ("call_module", "call_function", "call_method")
        and node_info(node).op_kind in _PASS_THROUGH
        and len(node.all_input_nodes) == 1
        and len(node.users) == 1
    ):
        node = node.all_input_nodes[0]
    return node


def layer_uses(graph: fx.Graph) -> Counter:
    """How many nodes call each module or read each attribute: ("call_module" | "get_attr", target)."""
    return Counter((n.op, str(n.target)) for n in graph.nodes if n.op in ("call_module", "get_attr"))


def fold_target(node: fx.Node, gm: fx.GraphModule, uses: Counter) -> FoldTarget:
    if node.op == "call_module":
        calls = uses[("call_module", str(node.target))]
        if calls > 1:
            return FoldTarget(
                node,
                None,
                f"{node.target} is called {calls} times (shared weights, or replayed "
                "on prompts); folding would change every call",
            )
        return FoldTarget(node, gm.get_submodule(str(node.target)))
    name = node_info(node).op_name  # F.linear and aten.linear.default alike (fx and torch.export graphs)
    view_kind = _FUNCTIONAL_VIEWS.get(name) if node.op == "call_function" else None
    if view_kind is None or view_kind == "product" and node_info(node).op_kind != "linear":
        return FoldTarget(
            node,
            None,
            f"{node.name} ({node_info(node).op_kind or node.op}) is not a linear, conv, "
            "norm or embedding layer whose weights folding can write",
        )
    arguments = _arguments(node, gm, view_kind)
    if isinstance(arguments, str):
        return FoldTarget(node, None, arguments)
    parameters = {}
    for key in ("weight", "bias"):
        if arguments.get(key) is None:
            continue
        value = _parameter_behind(arguments[key], gm, uses)
        if value is None and not (view_kind == "product" and key == "bias"):  # addmm(b, x, W): W folds whatever b is
            return FoldTarget(node, None, f"the {key} of {node.name} is computed or shared, not one parameter")
        if value is not None:
            parameters[key] = value  # a buffer too (a blur filter)
    if "weight" not in parameters:
        return FoldTarget(node, None, f"{node.name} has no weight to fold into")
    weight = parameters["weight"]
    if view_kind == "product":  # x @ W reads W as [in, out]; the view sees it [out, in], writes reach W's own layout
        weight = weight.t()
        if parameters.get("bias") is not None and tuple(parameters["bias"].shape) != (weight.shape[0],):
            del parameters["bias"]  # a bias per row of x, not per channel: LoRA still folds into W
    if view_kind == "norm":
        view: nn.Module = nn.LayerNorm(tuple(arguments["normalized_shape"]), elementwise_affine=False)
    elif view_kind == "conv":
        geometry = functional_conv_geometry(node, gm)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[weight.dim() - 2]
        view = conv(
            weight.shape[1] * geometry.groups,
            weight.shape[0],
            geometry.kernel_size,
            geometry.stride,
            geometry.padding,
            geometry.dilation,
            groups=geometry.groups,
            bias=False,
            device="meta",
        )
    elif view_kind == "embedding":
        view = nn.Embedding(*weight.shape, device="meta")
        view.weight = _shared_parameter(weight)
        return FoldTarget(node, view, can_add_bias=False)
    else:
        view = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    view.weight, view.bias = _shared_parameter(weight), _shared_parameter(parameters.get("bias"))
    return FoldTarget(node, view, can_add_bias="bias" in parameters)


def _arguments(node: fx.Node, gm: fx.GraphModule, view_kind: str) -> dict | str:
    """The functional layer's arguments by name (weight, bias, normalized_shape), or why they cannot be read."""
    if view_kind == "conv":
        return conv_arguments(node)
    if view_kind == "embedding":
        return embedding_arguments(node)
    if view_kind == "product":
        if any(node.kwargs.get(key, 1) != 1 for key in ("alpha", "beta")):
            return f"{node.name} scales its product or its bias (alpha, beta); B @ A cannot join W alone"
        x, weight = matmul_operands(node)[:2]
        if not isinstance(x, fx.Node) or is_weight(x) or not isinstance(weight, fx.Node) or not is_weight(weight):
            return f"{node.name} multiplies its weight from the left (W @ x), not x @ W"
        return {"weight": weight, "bias": node.args[0] if node_info(node).op_name == "addmm" else None}
    normalized = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    return normalized.kwargs if normalized is not None else f"cannot read the arguments of {node.name}"


def _parameter_behind(arg: object, gm: fx.GraphModule, uses: Counter) -> torch.Tensor | None:
    """The parameter (or buffer) ``arg`` is, or the view of it the layout ops between them make (W.t(),
    aten.t, a permute, a view): writes to it reach the parameter. None when computed (a copy) or shared."""
    chain = []
    while (
        isinstance(arg, fx.Node)
        and arg.op in ("call_function", "call_method")
        and node_info(arg).op_kind in _LAYOUT
        and len(arg.all_input_nodes) == 1
        and len(arg.users) == 1
    ):
        chain.append(arg)
        arg = arg.all_input_nodes[0]
    if (
        not isinstance(arg, fx.Node)
        or arg.op != "get_attr"
        or len(arg.users) != 1
        or uses[("get_attr", str(arg.target))] != 1
    ):
        return None
    value = parameter = operator.attrgetter(str(arg.target))(gm)
    with torch.no_grad():
        for step in reversed(chain):  # each step reads only the value before it
            args, kwargs = fx.node.map_arg((step.args, step.kwargs), lambda _, v=value: v)
            method = step.op == "call_method"
            value = getattr(value, str(step.target))(*args[1:], **kwargs) if method else step.target(*args, **kwargs)
    if not isinstance(value, torch.Tensor) or value.numel() != parameter.numel():
        return None
    return value if value.untyped_storage().data_ptr() == parameter.untyped_storage().data_ptr() else None


def _shared_parameter(tensor: torch.Tensor | None) -> nn.Parameter | None:
    """A buffer (a blur filter) as a view's parameter: the same storage, so the fold's writes reach it."""
    if tensor is None or isinstance(tensor, nn.Parameter):
        return tensor
    return nn.Parameter(tensor, requires_grad=False)


def channel_axis(layer: nn.Module, node: fx.Node) -> int | None:
    """Which axis of the layer's output holds the channels its weights index."""
    if isinstance(layer, nn.Linear):
        return -1
    if isinstance(layer, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
        return 1
    shape = node_info(node).shape
    weight = getattr(layer, "weight", None)
    if shape and weight is not None and weight.dim() == 1:
        axes = [axis for axis in (-1, 1) if len(shape) > 1 and shape[axis] == weight.shape[0]]
        return axes[0] if len(axes) == 1 else None
    return None
