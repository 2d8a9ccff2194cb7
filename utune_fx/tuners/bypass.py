"""Res-Tuning-Bypass (Jiang et al., arXiv 2310.19859): tuners on a side ladder beside the frozen backbone.

    s_0 = sg(x_0)                             x_0: the first stem's input; sg: stop-gradient (detach)
    s_i = H_i(sg(x_i)) + V_i(s_{i-1})         x_i: stem i's output, i = 1..L
    H(x) = x + U_h(x)                         horizontal res-tuner, on the stem's feature
    V(s) = P(s) + U_v(s)                      vertical res-tuner, carrying the side state
    x_L' = x_L + gamma * norm(s_L) + beta     the join: gamma = beta = 0 at the start

U is the U-Tuner's W_up(act(W_down(.))) with W_up zero-initialised (tuners/adapters.py). P carries
the state to the stem's shape: the identity; an average pool where the stem downsamples feature maps;
nothing where the channels change (U_v alone then, as a ResNet's projection shortcut replaces its
identity). ``vertical: false`` drops U_v (the paper's horizontal-only ablation). No gradient reaches
the backbone: it runs on frozen weights and the ladder reads it through sg, so backpropagation and
the activations it keeps stay on the side path. The rewriter builds the ladder (rewrite/bypass.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from utune_fx.tuners import RegionSize, Site, TunerConfig, check, register_tuner
from utune_fx.tuners.adapters import ACTIVATIONS, Adapter, adapter_parameters, check_bottleneck


def _pool(x: torch.Tensor, stride: tuple[int, ...] | None) -> torch.Tensor:
    if not stride:
        return x
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(stride)]
    return pool(x, stride, stride)


class BypassStep(nn.Module):
    """One rung: s_i = H(x_i) + V(s_{i-1}). ``site``: channels_in of the state it carries, channels_out
    and layout of the stem's output, ``stride`` where the stem downsamples the state's feature maps;
    ``relayout``: what it carries is the stem's tokens in another layout (reshaped last)."""

    def __init__(self, config: ResTuningBypassConfig, site: Site, relayout: bool = False):
        super().__init__()
        self.relayout = relayout  # what it carries takes the stem's layout of the same tokens ([B, H*W, C])
        self.horizontal = Adapter(config, replace(site, channels_in=site.channels_out, stride=None))
        # feature maps with channels last ([B, H, W, C], Swin) are pooled and projected channels first
        self.channels_last_maps = bool(site.stride) and not site.channels_first
        self.stride = site.stride
        self.carries = site.channels_in == site.channels_out
        vertical_site = replace(site, channels_first=site.channels_first or self.channels_last_maps)
        self.vertical = Adapter(config, vertical_site) if config.vertical or not self.carries else None

    def forward(self, feature: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        if self.channels_last_maps:
            state = state.movedim(-1, 1)
        carried = _pool(state, self.stride) if self.carries else None
        if self.vertical is not None:
            update = self.vertical(state)
            carried = update if carried is None else carried + update
        if self.channels_last_maps:
            carried = carried.movedim(1, -1)
        if self.relayout:
            carried = carried.reshape(*feature.shape[:-1], carried.shape[-1])
        return feature + self.horizontal(feature) + carried


class BypassJoin(nn.Module):
    """x_L' = x_L + gamma * norm(s_L) + beta, over the channel axis, gamma and beta zero at the start:
    the tuned model computes the frozen one's outputs until training moves them."""

    def __init__(self, config: ResTuningBypassConfig, site: Site):
        super().__init__()
        self.axis = 1 if site.channels_first else -1
        shape = [site.channels_out] + ([1] * (site.rank - 2) if site.channels_first else [])
        self.gamma = nn.Parameter(torch.zeros(shape))
        self.beta = nn.Parameter(torch.zeros(shape))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        mean = state.mean(self.axis, keepdim=True)
        centred = state - mean
        normed = centred * torch.rsqrt(centred.pow(2).mean(self.axis, keepdim=True) + 1e-6)
        return normed * self.gamma + self.beta


@register_tuner("res_tuning_bypass", positions=("bypass",), module=BypassStep)
@dataclass
class ResTuningBypassConfig(TunerConfig):
    """Res-Tuning-Bypass: a side ladder of res-tuners over the stems' detached outputs, joined to the
    last stem's output through a zero-initialised scale; no backpropagation through the backbone."""

    hidden: int = field(default=8, metadata={"help": "bottleneck width of each res-tuner's W_down / W_up"})
    activation: str = field(default="relu", metadata={"help": f"one of {', '.join(ACTIVATIONS)}"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the bottlenecks, in [0, 1)"})
    vertical: bool = field(
        default=True, metadata={"help": "vertical res-tuners on the side state (false: horizontal only)"}
    )

    def __post_init__(self) -> None:
        check_bottleneck(self)
        check(isinstance(self.vertical, bool), f"vertical must be true or false, got {self.vertical!r}")

    def added_parameters(self, size: RegionSize) -> int:
        """One rung per stem (the state comes in with the previous stem's channels); the join on the last."""
        state = size.previous_out or size.channels_in
        rung = adapter_parameters(self.hidden, RegionSize(size.channels_out, size.channels_out))
        if self.vertical or state != size.channels_out:
            rung += adapter_parameters(self.hidden, RegionSize(state, size.channels_out))
        return rung + (2 * size.channels_out if size.last else 0)
