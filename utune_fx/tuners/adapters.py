"""Adapters: the U-Tuner (parallel) and Houlsby/Pfeiffer (sequential).

    parallel:    x' = OP(x) + s * W_up(act(W_down(x)))      (U reads the region's input)
    sequential:  x' = OP(x) + s * W_up(act(W_down(OP(x))))  (U reads the region's output)

W_up starts at zero, so the tuned model starts exactly as the frozen one. On
tokens [B, N, C] the projections are Linear layers on the last axis; on
feature maps [B, C, H, W] they are 1x1 convolutions, W_down strided when the
region downsamples (a ResNet stage's first block).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from utune_fx.tuners import RegionSize, Site, TunerConfig, check, check_dropout, check_positive_int, register_tuner

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "identity": nn.Identity}


class Adapter(nn.Module):
    def __init__(self, config: ParallelAdapterConfig | SequentialAdapterConfig, site: Site):
        super().__init__()
        hidden = config.hidden
        if site.channels_first:
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[site.rank - 2]
            # a downsampling region gets a strided W_down, like ResNet's projection shortcut
            self.down = conv(site.channels_in, hidden, 1, stride=site.stride or 1)
            self.up = conv(hidden, site.channels_out, 1)
        else:
            self.down, self.up = nn.Linear(site.channels_in, hidden), nn.Linear(hidden, site.channels_out)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = ACTIVATIONS[config.activation]()
        # p = 0 dropout still allocates an output and a mask in training: skip it
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        scale = getattr(config, "scale", 1.0)  # the sequential form has none
        self.scale = nn.Parameter(torch.ones(())) if scale == "learned" else None
        self.fixed_scale = 1.0 if scale == "learned" else float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.up(self.dropout(self.act(self.down(x))))
        if self.scale is not None:
            return out * self.scale
        return out if self.fixed_scale == 1.0 else out * self.fixed_scale


def check_bottleneck(config) -> None:
    """The settings every bottleneck of W_down / W_up shares: hidden, activation, dropout."""
    check_positive_int("hidden", config.hidden)
    check(
        isinstance(config.activation, str) and config.activation in ACTIVATIONS,
        f"activation must be one of {', '.join(ACTIVATIONS)}, got {config.activation!r}",
    )
    check_dropout(config.dropout)


def adapter_parameters(hidden: int, size: RegionSize, learned_scale: bool = False) -> int:
    return size.channels_in * hidden + hidden + hidden * size.channels_out + size.channels_out + int(learned_scale)


@register_tuner("parallel_adapter", positions=("parallel",), module=Adapter)
@dataclass
class ParallelAdapterConfig(TunerConfig):
    """The U-Tuner: x' = OP(x) + s * W_up(act(W_down(x))), W_up zero-initialised."""

    hidden: int = field(default=8, metadata={"help": "bottleneck width of W_down / W_up"})
    activation: str = field(default="relu", metadata={"help": f"one of {', '.join(ACTIVATIONS)}"})
    scale: float | str = field(default=1.0, metadata={"help": "fixed scale s, or 'learned'"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the bottleneck, in [0, 1)"})

    def __post_init__(self) -> None:
        check_bottleneck(self)
        check(
            self.scale == "learned" or isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool),
            f"scale must be a number or 'learned', got {self.scale!r}",
        )

    def added_parameters(self, size: RegionSize) -> int:
        return adapter_parameters(self.hidden, size, self.scale == "learned")


@register_tuner("sequential_adapter", positions=("sequential",), module=Adapter)
@dataclass
class SequentialAdapterConfig(TunerConfig):
    """Houlsby/Pfeiffer adapter on OP's output: x' = OP(x) + W_up(act(W_down(OP(x))))."""

    hidden: int = field(default=8, metadata={"help": "bottleneck width"})
    activation: str = field(default="relu", metadata={"help": f"one of {', '.join(ACTIVATIONS)}"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the bottleneck, in [0, 1)"})

    def __post_init__(self) -> None:
        check_bottleneck(self)

    def added_parameters(self, size: RegionSize) -> int:
        return adapter_parameters(self.hidden, RegionSize(size.channels_out, size.channels_out), False)
