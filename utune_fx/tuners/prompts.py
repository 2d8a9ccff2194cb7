"""Prompts (VPT, Jia et al. 2022): learnable tokens P that join a block's token sequence.

    shallow:  [x; P] enters the first selected block once; P's outputs carry on
              through the selected blocks, as VPT-shallow's tokens do
    deep:     every selected block l gets its own P_l (VPT-deep: new tokens before each block)

The real tokens meet the prompts only inside attention, as extra keys and values
made from P by the block's own frozen norm and key/value projections (the
U-Tuning paper's unified view: a prompt is a prefix whose K_p, V_p are tied to
tokens). The rewriter replays those frozen operations on P and joins the result
through ``GatedConcatAttention``, whose gate starts at 0, so the tuned model
starts as the frozen one. Prompt tokens get no positional encoding (no rotary
or relative-position bias), as VPT pads those with zeros; in windowed attention
(Swin) they join every window and their own outputs are averaged over the
windows, as in VPT's Swin variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from utune_fx.tuners import RegionSize, Site, TunerConfig, check, check_positive_int, register_tuner


class PromptTokens(nn.Module):
    """P: [length, channels] tokens, initialised uniformly like VPT (Xavier over the token width)."""

    def __init__(self, config: PromptConfig, site: Site):
        super().__init__()
        bound = (3.0 / site.channels_in) ** 0.5
        self.tokens = nn.Parameter(torch.empty(config.length, site.channels_in).uniform_(-bound, bound))

    def forward(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens as a [batch, length, channels] sequence beside ``like`` ([batch, N, channels]),
        or as [1, length, channels] (deep prompts, which only make keys and values)."""
        if like is None:
            return self.tokens.unsqueeze(0)
        return self.tokens.to(like.dtype).expand(like.shape[0], *self.tokens.shape)


@register_tuner("prompt", positions=("prompt",), module=PromptTokens)
@dataclass
class PromptConfig(TunerConfig):
    """VPT: learnable tokens joined to the token sequence once (shallow) or before every selected block (deep)."""

    length: int = field(default=10, metadata={"help": "number of prompt tokens"})
    deep: bool = field(
        default=False,
        metadata={
            "help": "new tokens before every selected block (VPT-deep); false: once, before the first selected block"
        },
    )

    def __post_init__(self) -> None:
        check_positive_int("length", self.length)
        check(isinstance(self.deep, bool), f"deep must be true or false, got {self.deep!r}")

    def added_parameters(self, size: RegionSize) -> int:
        tokens = self.length * size.channels_in if self.deep or size.position == 0 else 0
        return tokens + size.heads  # one gate per attention head
