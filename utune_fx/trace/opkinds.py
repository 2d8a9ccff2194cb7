"""Normalised op kinds: one vocabulary however a model spells an operation.

Rules select operations by kind, so ``nn.Linear``, ``F.linear``,
``torch.ops.aten.linear`` and ``x @ self.weight.t()`` must all read ``linear``.

    call_module  blocks.0.attn.qkv (nn.Linear)       -> op_name 'Linear',  kind 'linear'
    call_function F.linear(x, w, b)                  -> op_name 'linear',  kind 'linear'
    call_function aten.addmm.default(b, x, w_t)      -> op_name 'addmm',   kind 'linear'
    call_function operator.matmul(x, t(w_param))     -> op_name 'matmul',  kind 'linear'
    call_function operator.matmul(q, k_t)            -> op_name 'matmul',  kind 'matmul'
    call_method   x.view(B, N, C)                    -> op_name 'view',    kind 'reshape'

The whole vocabulary with its spellings is in docs/opkinds.md; the
softmax(QK^T)V subgraph becoming ``attention`` is in :mod:`.attention`.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

# kind -> canonical op names (functions, methods and aten overload packets).
_NAMES_BY_KIND: dict[str, tuple[str, ...]] = {
    "linear": ("linear", "bilinear"),
    "conv": (
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "convolution",
        "_convolution",
        "conv_tbc",
    ),
    "norm": (
        "layer_norm",
        "native_layer_norm",
        "batch_norm",
        "native_batch_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training",
        "_native_batch_norm_legit_functional",
        "group_norm",
        "native_group_norm",
        "instance_norm",
        "rms_norm",
        "_fused_rms_norm",
        "local_response_norm",
        "normalize",
    ),
    "act": (
        "relu",
        "relu_",
        "relu6",
        "gelu",
        "gelu_",
        "silu",
        "silu_",
        "sigmoid",
        "sigmoid_",
        "tanh",
        "tanh_",
        "hardswish",
        "hardswish_",
        "hardsigmoid",
        "hardsigmoid_",
        "hardtanh",
        "hardtanh_",
        "mish",
        "mish_",
        "leaky_relu",
        "leaky_relu_",
        "elu",
        "elu_",
        "selu",
        "celu",
        "softplus",
        "prelu",
        "_prelu_kernel",
        "glu",
        "logsigmoid",
        "softsign",
        "tanhshrink",
        "threshold",
        "rrelu",
    ),
    "softmax": ("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax", "softmin"),
    "attention": (
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_attention_math",
        "multi_head_attention_forward",
        "flex_attention",
    ),
    "matmul": ("matmul", "mm", "bmm", "einsum", "baddbmm", "addmm", "addbmm", "__matmul__"),
    "add": ("add", "add_", "iadd", "__add__", "__radd__", "__iadd__"),
    "sub": ("sub", "sub_", "rsub", "isub", "__sub__", "__rsub__"),
    "mul": ("mul", "mul_", "imul", "__mul__", "__rmul__", "__imul__"),
    "div": ("div", "div_", "truediv", "__truediv__", "__rtruediv__"),
    "cat": ("cat", "concat", "concatenate", "stack", "hstack", "vstack"),
    "reshape": (
        "view",
        "reshape",
        "flatten",
        "unflatten",
        "squeeze",
        "unsqueeze",
        "contiguous",
        "expand",
        "expand_as",
        "view_as",
        "reshape_as",
        "_unsafe_view",
        "broadcast_to",
        "repeat",
        "squeeze_",
        "unsqueeze_",
        "alias",
    ),
    # numpy_T, mT: aten spellings of x.T and x.mT under torch.export (Falcon reads its weights as W.T)
    "permute": (
        "permute",
        "transpose",
        "t",
        "numpy_T",
        "mT",
        "swapaxes",
        "swapdims",
        "movedim",
        "transpose_",
        "roll",
        "flip",
    ),
    "getitem": ("getitem", "select", "slice", "narrow", "index_select"),
    "split": ("split", "split_with_sizes", "chunk", "unbind", "tensor_split"),
    "embedding": ("embedding", "embedding_bag"),
    "pool": (
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "max_pool2d_with_indices",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "adaptive_avg_pool3d",
        "_adaptive_avg_pool2d",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "adaptive_max_pool3d",
        "lp_pool1d",
        "lp_pool2d",
    ),
    "reduce": ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod", "logsumexp", "norm"),
    "dropout": (
        "dropout",
        "dropout_",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "feature_dropout",
        "alpha_dropout",
        "feature_alpha_dropout",
        "native_dropout",
    ),
    "resize": (
        "interpolate",
        "upsample",
        "upsample_nearest2d",
        "upsample_bilinear2d",
        "upsample_bicubic2d",
        "pixel_shuffle",
        "pixel_unshuffle",
    ),
    "pad": ("pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d"),
    "compare": ("eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__gt__", "isnan", "isinf"),
    "arith": (
        "mod",
        "fmod",
        "remainder",
        "floordiv",
        "neg",
        "pow",
        "sqrt",
        "rsqrt",
        "exp",
        "log",
        "abs",
        "clamp",
        "clamp_",
        "clip",
        "floor",
        "ceil",
        "round",
        "reciprocal",
        "sign",
        "maximum",
        "minimum",
        "where",
        "masked_fill",
        "masked_fill_",
        "erf",
        "sin",
        "cos",
        "square",
        "addcmul",
    ),
    "cast": ("to", "type", "type_as", "float", "half", "bfloat16", "double", "_to_copy"),
    "shape": ("getattr", "size", "dim", "numel", "sym_size", "sym_numel", "_shape_as_tensor"),
    "assert": ("_assert", "_assert_is_none", "_assert_async", "_assert_scalar"),
}
KIND_OF_NAME: dict[str, str] = {name: kind for kind, names in _NAMES_BY_KIND.items() for name in names}

# Module classes -> kind, checked in order with isinstance (so subclasses, such
# as timm's Conv2dSame or LayerNorm2d, take their base's kind).
_MODULE_KINDS: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (nn.MultiheadAttention, "attention"),
    ((nn.Linear, nn.Bilinear, nn.LazyLinear), "linear"),
    (nn.modules.conv._ConvNd, "conv"),
    ((nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm), "norm"),
    ((nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d), "softmax"),
    ((nn.Embedding, nn.EmbeddingBag), "embedding"),
    (
        (
            nn.modules.pooling._AvgPoolNd,
            nn.modules.pooling._MaxPoolNd,
            nn.modules.pooling._AdaptiveAvgPoolNd,
            nn.modules.pooling._AdaptiveMaxPoolNd,
            nn.modules.pooling._LPPoolNd,
        ),
        "pool",
    ),
    ((nn.modules.dropout._DropoutNd,), "dropout"),
    ((nn.Flatten, nn.Unflatten), "reshape"),
    ((nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle), "resize"),
    (nn.Identity, "identity"),
)
_ACTIVATION_MODULE = "torch.nn.modules.activation"

# Every kind a node can carry; docs/opkinds.md documents each one.
OP_KINDS: tuple[str, ...] = tuple(_NAMES_BY_KIND) + (
    "identity",
    "input",
    "param",
    "constant",
    "output",
    "opaque",
    "tuner",
    "other",
)
# Kinds that carry the weights tuners attach to.
WEIGHTED_KINDS = frozenset({"linear", "conv", "attention", "embedding", "opaque"})

_OPERATOR_NAMES = {
    operator.add: "add",
    operator.iadd: "add",
    operator.sub: "sub",
    operator.isub: "sub",
    operator.mul: "mul",
    operator.imul: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    operator.floordiv: "floordiv",
    operator.matmul: "matmul",
    operator.imatmul: "matmul",
    operator.getitem: "getitem",
    operator.neg: "neg",
    operator.pow: "pow",
}


def op_name(node: fx.Node, module: nn.Module | None = None) -> str:
    """The canonical spelling of what ``node`` computes."""
    if node.op == "call_module":
        return type(module).__name__ if module is not None else str(node.target)
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return node.op
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return target.__name__.split(".")[0]  # 'linear.default' -> 'linear'
    if target in _OPERATOR_NAMES:
        return _OPERATOR_NAMES[target]
    return getattr(target, "__name__", str(target))


def module_kind(module: nn.Module) -> str:
    for classes, kind in _MODULE_KINDS:
        if isinstance(module, classes):
            return kind
    if type(module).__module__ == _ACTIVATION_MODULE:
        return "act"
    return "opaque"


def base_kind(node: fx.Node, module: nn.Module | None, name: str) -> str:
    """Kind of one node on its own; :func:`refine_linear` and the attention
    detector then look at neighbours."""
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return "param" if not str(node.target).startswith("_tensor_constant") else "constant"
    if node.op == "call_module":
        return module_kind(module) if module is not None else "opaque"
    if name in ("max", "min") and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
        return "arith"  # torch.max(a, b): elementwise, as maximum (XGLM clamps its scores so)
    return KIND_OF_NAME.get(name, "other")


# Ops a parameter passes through and is still "the parameter" (w.t(), w.to(dtype)).
_PARAM_TRANSPARENT = frozenset({"permute", "reshape", "cast", "identity"})


def is_parameter_derived(node: object, kinds: dict[fx.Node, str]) -> bool:
    """True if ``node`` is a parameter, or one seen through transposes/casts."""
    while isinstance(node, fx.Node):
        kind = kinds.get(node)
        if kind == "param":
            return True
        if kind not in _PARAM_TRANSPARENT:
            return False
        node = node.args[0] if node.args else None
    return False


def matmul_operands(node: fx.Node) -> list[object]:
    """The tensor operands of a matmul-family node (einsum's equation skipped)."""
    name = op_name(node)
    args = list(node.args)
    if name == "einsum":
        operands = args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        return operands
    if name in ("addmm", "baddbmm", "addbmm"):
        return args[1:3]
    return args[:2]


def refine_linear(node: fx.Node, kinds: dict[fx.Node, str]) -> str | None:
    """A matmul against a parameter is a linear layer spelled by hand."""
    if kinds.get(node) != "matmul":
        return None
    operands = matmul_operands(node)
    if any(is_parameter_derived(arg, kinds) for arg in operands):
        return "linear"
    return None
