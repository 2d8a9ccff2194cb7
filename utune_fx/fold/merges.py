"""Weight algebra of folding: what a linear tuner adds to the layer it sits on.

    LoRA on W (linear/conv, grouped too):  W' = W + s * B @ A            (per group)
    LoRA on an embedding table T [V, D]:   T' = T + s * (B @ A).T
    parallel adapter, identity activation, on one layer y = W x + b:
                                            W' = W + s * U @ D,  b' = b + s * (U d + u)
    affine update after a layer, y' = M y + c (sequential adapter with identity
    activation: M = I + U @ D, c = U d + u; scale/shift: M = diag(1 + g), c = b):
                                            W' = M W,  b' = M b + c   (linear, conv)
                                            w' = diag(M) w, b' = diag(M) b + c  (norm)

Every merge is computed in float32 and cast back to the layer's dtype, so
bf16/fp16 weights lose no more than one rounding. Each function returns None
on success, or the reason the merge does not apply (which the fold report
shows), and writes nothing in that case.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from utune_fx.tuners.adapters import Adapter
from utune_fx.tuners.lora import LoraBranch
from utune_fx.tuners.scale_shift import ScaleShift

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _assign(parameter: nn.Parameter, value: torch.Tensor) -> None:
    with torch.no_grad():
        parameter.copy_(value.to(parameter.dtype))


def _set_bias(layer: nn.Module, bias: torch.Tensor) -> None:
    """Write a bias, creating it on layers built without one."""
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=False)
    else:
        _assign(layer.bias, bias)


def is_identity(module: nn.Module) -> bool:
    return isinstance(module, (nn.Identity, nn.Dropout))  # dropout is the identity at inference


def _matrix(layer: nn.Module) -> torch.Tensor:
    """A 1x1 conv or linear weight as an [out, in] float32 matrix."""
    return layer.weight.detach().float().reshape(layer.weight.shape[0], layer.weight.shape[1])


def lora_delta(branch: LoraBranch) -> torch.Tensor:
    """s * B @ A with the target weight's shape ([out, in], [out, in/groups, *kernel], or an
    embedding's [num_embeddings, dim])."""
    a, b = branch.lora_A.weight.detach().float(), branch.lora_B.weight.detach().float()
    if isinstance(branch.lora_A, nn.Embedding):  # A's table is A.T [V, r]: (B @ A).T = A.T @ B.T
        return a @ b.T * branch.scaling
    groups = getattr(branch.lora_A, "groups", 1)
    if getattr(branch.lora_A, "transposed", False):  # A [in, r, *kernel], the weight [in, out/groups, *kernel]
        rank = a.shape[1]
        a_groups = a.reshape(groups, a.shape[0] // groups, rank, -1)  # [g, in/g, r, kernel]
        b_groups = b.reshape(groups, b.shape[0] // groups, rank)  # [g, out/g, r]
        delta = torch.einsum("girk,gor->giok", a_groups, b_groups).reshape(a.shape[0], -1, *a.shape[2:])
        return delta * branch.scaling
    rank = a.shape[0] // groups
    a_groups = a.reshape(groups, rank, -1)  # [g, r, in/g * kernel]
    b_groups = b.reshape(groups, b.shape[0] // groups, rank)  # [g, out/g, r]
    delta = torch.bmm(b_groups, a_groups).reshape(b.shape[0], *a.shape[1:])
    return delta * branch.scaling


def merge_lora(layer: nn.Module, branch: LoraBranch) -> str | None:
    if isinstance(layer, nn.modules.conv._ConvNd):
        if layer.padding_mode != "zeros":
            return f"the conv pads with {layer.padding_mode!r}, LoRA's A with zeros"
        if getattr(branch.lora_A, "groups", 1) != layer.groups:
            return f"LoRA's A has {branch.lora_A.groups} groups, the conv {layer.groups}"
    delta = lora_delta(branch)
    if tuple(delta.shape) != tuple(layer.weight.shape):
        return f"B @ A has shape {list(delta.shape)}, the weight {list(layer.weight.shape)}"
    _assign(layer.weight, layer.weight.detach().float() + delta)
    return None


def _adapter_affine(adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(s U D, s (U d + u)) of an adapter whose activation is the identity, else the reason."""
    if not is_identity(adapter.act):
        return f"its activation {type(adapter.act).__name__} makes U(x) nonlinear in x"
    for projection in (adapter.down, adapter.up):
        if isinstance(projection, nn.modules.conv._ConvNd) and (
            math.prod(projection.kernel_size) != 1 or projection.groups != 1
        ):
            return "its projections are not pointwise"
    scale = adapter.scale.detach().float() if adapter.scale is not None else torch.tensor(adapter.fixed_scale)
    up, down = _matrix(adapter.up), _matrix(adapter.down)
    bias_down = adapter.down.bias.detach().float() if adapter.down.bias is not None else torch.zeros(down.shape[0])
    bias_up = adapter.up.bias.detach().float() if adapter.up.bias is not None else torch.zeros(up.shape[0])
    return scale * up @ down, scale * (up @ bias_down + bias_up)


def _center_tap(layer: nn.modules.conv._ConvNd, stride: tuple[int, ...]) -> tuple[slice, ...] | str:
    """Index of the kernel tap that reads the same input pixel as a 1x1 conv of ``stride``."""
    if layer.groups != 1:
        return f"the conv has {layer.groups} groups; a dense update cannot join its weight"
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str) and layer.padding != "same":
        return "the conv's padding does not centre its kernel"
    taps = []
    for k, p, d, s, own in zip(layer.kernel_size, _padding(layer), layer.dilation, layer.stride, stride):
        if k % 2 == 0 or p != d * (k - 1) // 2 or s != own:
            return "the adapter's 1x1 conv does not read the conv's centre tap (kernel, padding or stride differ)"
        taps.append(slice((k - 1) // 2, (k - 1) // 2 + 1))
    return tuple(taps)


def _padding(layer: nn.modules.conv._ConvNd) -> tuple[int, ...]:
    if layer.padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(layer.kernel_size, layer.dilation))
    return tuple(layer.padding)


def merge_parallel_adapter(layer: nn.Module, adapter: Adapter) -> str | None:
    """y = layer(x) + U(x) with U linear: add U's matrix to the layer's weight."""
    affine = _adapter_affine(adapter)
    if isinstance(affine, str):
        return affine
    matrix, shift = affine
    weight = layer.weight.detach().float()
    if isinstance(layer, nn.Linear):
        weight = weight + matrix
    elif isinstance(layer, nn.modules.conv._ConvNd):
        stride = getattr(adapter.down, "stride", (1,) * (weight.dim() - 2))
        tap = _center_tap(layer, stride)
        if isinstance(tap, str):
            return tap
        weight = weight.clone()
        weight[(slice(None), slice(None), *tap)] += matrix.reshape(weight[(slice(None), slice(None), *tap)].shape)
    else:
        return f"the region's operation is {type(layer).__name__}, not a linear or conv"
    _assign(layer.weight, weight)
    _set_bias(layer, (layer.bias.detach().float() if layer.bias is not None else 0) + shift)
    return None


def sequential_affine(tuner: nn.Module) -> tuple[torch.Tensor, torch.Tensor, bool] | str:
    """(M, c, diagonal) of y' = y + T(y) = M y + c, else the reason it is not affine."""
    if isinstance(tuner, ScaleShift):
        scale = 1 + tuner.scale.detach().float()
        shift = tuner.shift.detach().float() if tuner.shift is not None else torch.zeros_like(scale)
        return torch.diag(scale), shift, True
    if isinstance(tuner, Adapter):
        affine = _adapter_affine(tuner)
        if isinstance(affine, str):
            return affine
        matrix, shift = affine
        return torch.eye(matrix.shape[0]) + matrix, shift, False
    return f"{type(tuner).__name__} is not an affine map"


def merge_after(layer: nn.Module, matrix: torch.Tensor, shift: torch.Tensor, diagonal: bool) -> str | None:
    """Fold y' = M y + c into the layer that computes y."""
    bias = layer.bias.detach().float() if getattr(layer, "bias", None) is not None else None
    if isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)):
        if not diagonal and getattr(layer, "groups", 1) != 1:
            return f"a dense channel mix cannot join a conv with {layer.groups} groups"
        weight = layer.weight.detach().float()
        _assign(layer.weight, torch.einsum("oc,c...->o...", matrix, weight))
        _set_bias(layer, (matrix @ bias if bias is not None else 0) + shift)
        return None
    if isinstance(layer, _NORMS):
        if not diagonal:
            return f"a dense channel mix cannot join {type(layer).__name__}'s per-channel affine"
        if getattr(layer, "weight", None) is None or bias is None:
            return f"{type(layer).__name__} has no affine weight and bias to absorb the scale and shift"
        scale = torch.diagonal(matrix)
        if layer.weight.shape != scale.shape:
            return (
                f"{type(layer).__name__}'s weight has shape {list(layer.weight.shape)}, the tuner {list(scale.shape)}"
            )
        _assign(layer.weight, layer.weight.detach().float() * scale)
        _assign(layer.bias, bias * scale + shift)
        return None
    return f"the operation before it is {type(layer).__name__}, not a linear, conv or norm"
