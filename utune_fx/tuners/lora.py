"""LoRA on a linear or convolution: W x + (alpha / rank) * B(A(dropout(x))).

Initialised like PEFT: A kaiming-uniform (a = sqrt(5)), B zero. On a
convolution A copies the kernel size, stride, padding and dilation of the
frozen conv and B is 1x1, so the update has the conv's output shape; the
product folds into the frozen weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from utune_fx.tuners import RegionSize, Site, TunerConfig, check, check_dropout, check_positive_int, register_tuner


class LoraBranch(nn.Module):
    def __init__(self, config: "LoraConfig", site: Site):
        super().__init__()
        target = site.target
        rank = config.rank
        if target is None or target.kind == "linear":
            self.lora_A = nn.Linear(site.channels_in, rank, bias=False)
            self.lora_B = nn.Linear(rank, site.channels_out, bias=False)
        else:
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(target.kernel_size)]
            self.lora_A = conv(site.channels_in, rank, target.kernel_size, target.stride, target.padding,
                               target.dilation, bias=False)
            self.lora_B = conv(rank, site.channels_out, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()  # as PEFT
        self.scaling = config.alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


@register_tuner("lora", positions=("reparameterised",), module=LoraBranch)
@dataclass
class LoraConfig(TunerConfig):
    """LoRA on a linear or conv: W x + (alpha / rank) * B(A(x)), A kaiming-uniform, B zero."""

    rank: int = field(default=8, metadata={"help": "rank r of the update B @ A"})
    alpha: float = field(default=16.0, metadata={"help": "the update is scaled by alpha / rank"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the input of A, in [0, 1)"})

    def __post_init__(self) -> None:
        check_positive_int("rank", self.rank)
        check(isinstance(self.alpha, (int, float)) and self.alpha > 0, f"alpha must be positive, got {self.alpha!r}")
        check_dropout(self.dropout)

    def added_parameters(self, size: RegionSize) -> int:
        return self.rank * ((size.fan_in or size.channels_in) + size.channels_out)
