"""Find the layer a tuner folds into, as an nn.Module whose weights are the graph's own.

    %y = call_module[blocks.0.mlp.fc1](%x)                  -> blocks.0.mlp.fc1 (nn.Linear)
    %y = conv2d(%x, %w, %b, [16, 16])                       -> an nn.Conv2d view (stride 16)
    %y = layer_norm(%x, (192,), weight=%w, bias=%b)         -> an nn.LayerNorm view whose
         (%w, %b = get_attr blocks.0.norm1.weight / .bias)     weight and bias ARE those parameters

Tracing through timm's LayerNorm, and every graph of the torch.export front
end (aten.linear, aten.layer_norm), leaves functional calls whose weights are
get_attr nodes; the view lets the same merges write to them. A layer folds only
when nothing else reads its weights: a module called twice (shared weights, or
replayed on prompts) would change at every call.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn

from utune_fx.match.sizes import conv_arguments
from utune_fx.rewrite.passes import functional_conv_geometry
from utune_fx.trace import node_info

_PASS_THROUGH = ("identity", "dropout")  # no-ops at inference between a layer and a tuner
_FUNCTIONAL_VIEWS = {"layer_norm": "norm", "linear": "linear", "conv1d": "conv", "conv2d": "conv", "conv3d": "conv"}


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
    if node.op != "call_function" or name not in _FUNCTIONAL_VIEWS:
        return FoldTarget(
            node,
            None,
            f"{node.name} ({node_info(node).op_kind or node.op}) is not a linear, conv "
            "or norm layer whose weights folding can write",
        )
    if _FUNCTIONAL_VIEWS[name] == "conv":
        arguments = conv_arguments(node)
    else:
        normalized = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
        if normalized is None:
            return FoldTarget(node, None, f"cannot read the arguments of {node.name}")
        arguments = normalized.kwargs
    weights = {key: arguments.get(key) for key in ("weight", "bias")}
    parameters = {}
    for key, arg in weights.items():
        if arg is None:
            continue
        if (
            not isinstance(arg, fx.Node)
            or arg.op != "get_attr"
            or len(arg.users) != 1
            or uses[("get_attr", str(arg.target))] != 1
        ):
            return FoldTarget(node, None, f"the {key} of {node.name} is computed or shared, not one parameter")
        parameters[key] = operator.attrgetter(str(arg.target))(gm)  # a buffer too (a blur filter)
    if "weight" not in parameters:
        return FoldTarget(node, None, f"{node.name} has no weight to fold into")
    weight = parameters["weight"]
    if _FUNCTIONAL_VIEWS[name] == "norm":
        view: nn.Module = nn.LayerNorm(tuple(arguments["normalized_shape"]), elementwise_affine=False)
    elif _FUNCTIONAL_VIEWS[name] == "conv":
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
    else:
        view = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    view.weight, view.bias = _shared_parameter(weight), _shared_parameter(parameters.get("bias"))
    return FoldTarget(node, view, can_add_bias="bias" in parameters)


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
