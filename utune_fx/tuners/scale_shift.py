"""SSF / IA3: per-channel scale and shift of an operation's output.

    x' = OP(x) * (1 + g) + b  =  OP(x) + U(OP(x)),  U(y) = y * g + b,  g = b = 0 at init

so it sits at the sequential position like an adapter, and folds into the
linear, conv or norm before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from utune_fx.tuners import RegionSize, Site, TunerConfig, check, register_tuner


class ScaleShift(nn.Module):
    def __init__(self, config: ScaleShiftConfig, site: Site):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(site.channels_out))
        self.shift = nn.Parameter(torch.zeros(site.channels_out)) if config.shift else None
        self.axis = 1 if site.channels_first else -1

    def _broadcast(self, vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.axis == -1:
            return vector
        return vector.reshape((1, -1) + (1,) * (like.dim() - 2))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        out = y * self._broadcast(self.scale, y)
        return out + self._broadcast(self.shift, y) if self.shift is not None else out


@register_tuner("scale_shift", positions=("sequential",), module=ScaleShift)
@dataclass
class ScaleShiftConfig(TunerConfig):
    """SSF / IA3: x' = OP(x) * (1 + g) + b per channel, foldable."""

    shift: bool = field(default=True, metadata={"help": "also learn the shift b (IA3 has none)"})

    def __post_init__(self) -> None:
        check(isinstance(self.shift, bool), f"shift must be true or false, got {self.shift!r}")

    def added_parameters(self, size: RegionSize) -> int:
        return size.channels_out * (2 if self.shift else 1)
