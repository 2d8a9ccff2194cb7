"""LoRA on a linear, convolution or embedding: W x + (alpha / rank) * B(A(dropout(x))).

    Linear(in, out)          -> A = Linear(in, r),  B = Linear(r, out)      A kaiming-uniform, B zero
    Conv2d(in, out, k, s)    -> A = Conv2d(in, r, k, s), B = Conv2d(r, out, 1)
    Embedding(V, D)          -> A = Embedding(V, r), B = Linear(r, D)       A zero, B normal

Initialised like PEFT: A kaiming-uniform (a = sqrt(5)), B zero. On a
convolution A copies the kernel size, stride, padding and dilation of the
frozen conv and B is 1x1, so the update has the conv's output shape; the
product B @ A folds into the frozen weight.

A grouped conv (depthwise included) gets one low-rank update per group, A and
B grouped like the conv, so B @ A has the grouped weight's shape and folds.
On a transposed conv A is a transposed conv like it (B still 1x1 after it).
A group's update cannot have a higher rank than its weight matrix
[out/groups, in/groups * kernel], so the rank per group is capped there: a
depthwise conv gets rank 1 per channel (PEFT instead splits the rank over the
groups, which needs rank divisible by the number of channels).

On an embedding (as PEFT's lora.Embedding) the ids look up rows of A's table:
PEFT's A [r, V] is stored as that table, A.T [V, r], with the embedding's
padding row; the update embedding(ids, A.T) @ B.T * alpha / r folds into the
table as (B @ A).T * alpha / r. A starts at zero and B normal, as in PEFT, and
there is no dropout (the ids are integers; PEFT skips it too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from utune_fx.tuners import (
    ConvGeometry,
    RegionSize,
    Site,
    TunerConfig,
    check,
    check_dropout,
    check_positive_int,
    register_tuner,
)


class LoraBranch(nn.Module):
    def __init__(self, config: LoraConfig, site: Site):
        super().__init__()
        target = site.target
        kind = target.kind if target is not None else "linear"
        if kind == "embedding":
            self.lora_A = nn.Embedding(site.channels_in, config.rank, padding_idx=target.padding_idx)
            self.lora_B = nn.Linear(config.rank, site.channels_out, bias=False)
            nn.init.zeros_(self.lora_A.weight)
            nn.init.normal_(self.lora_B.weight)
        else:
            if kind == "linear":
                self.lora_A = nn.Linear(site.channels_in, config.rank, bias=False)
                self.lora_B = nn.Linear(config.rank, site.channels_out, bias=False)
            else:
                self.lora_A, self.lora_B = _conv_pair(config.rank, site, target)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        use_dropout = config.dropout and kind != "embedding"
        self.dropout = nn.Dropout(config.dropout) if use_dropout else nn.Identity()  # as PEFT
        self.scaling = config.alpha / config.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def _conv_pair(rank: int, site: Site, target: ConvGeometry) -> tuple[nn.Module, nn.Module]:
    """A with the conv's kernel, stride, padding, dilation and groups (transposed like it), B 1x1."""
    groups, dims = target.groups, len(target.kernel_size)
    fan_in = site.channels_in // groups * math.prod(target.kernel_size)
    rank = group_rank(rank, groups, site.channels_out, fan_in)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    transposed = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    lora_A = (transposed if target.transposed else conv)(
        site.channels_in,
        rank * groups,
        target.kernel_size,
        stride=target.stride,
        padding=target.padding,
        dilation=target.dilation,
        groups=groups,
        bias=False,
        **({"output_padding": target.output_padding} if target.transposed else {}),
    )
    return lora_A, conv(rank * groups, site.channels_out, 1, groups=groups, bias=False)


def group_rank(rank: int, groups: int, channels_out: int, fan_in: int) -> int:
    """Rank of each group's update: the configured rank, capped by a grouped weight's own rank."""
    return rank if groups == 1 else min(rank, channels_out // groups, fan_in)


@register_tuner("lora", positions=("reparameterised",), module=LoraBranch)
@dataclass
class LoraConfig(TunerConfig):
    """LoRA on a linear, conv or embedding: W x + (alpha / rank) * B(A(x)); PEFT's initialisation."""

    rank: int = field(default=8, metadata={"help": "rank r of the update B @ A"})
    alpha: float = field(default=16.0, metadata={"help": "the update is scaled by alpha / rank"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the input of A, in [0, 1)"})

    def __post_init__(self) -> None:
        check_positive_int("rank", self.rank)
        check(isinstance(self.alpha, (int, float)) and self.alpha > 0, f"alpha must be positive, got {self.alpha!r}")
        check_dropout(self.dropout)

    def added_parameters(self, size: RegionSize) -> int:
        fan_in = size.fan_in or size.channels_in  # an embedding's: its number of rows
        rank = group_rank(self.rank, size.groups, size.channels_out, fan_in)
        return rank * (size.groups * fan_in + size.channels_out)
