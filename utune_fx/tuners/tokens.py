"""Token tuners: prefixes on attention keys and values, and prompts (VPT).

    prefix, parallel form (Res-Tuning, arXiv 2310.19859: the prefix unbound
    from the frozen attention):
        out = Attn(Q, K, V) + softmax(Q K_p^T / sqrt(d)) V_p,   K_p, V_p: [heads, length, d]
    V_p starts at zero, so the tuned model starts exactly as the frozen one,
    and V_p's gradient (the attention weights on the prefix) is not zero.

The classic concatenated prefix Attn(Q, [K_p; K], [V_p; V]) and prompts
(VPT) cannot start as identity (the softmax always moves mass to the new
keys); their settings load and ``cli.py match`` counts them, and the
rewriter says that it does not insert them yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from utune_fx.tuners import RegionSize, Site, TunerConfig, check, check_positive_int, register_tuner


class ParallelPrefix(nn.Module):
    """softmax(Q K_p^T / sqrt(d)) V_p for queries [B, *heads, N, d]; site.channels_in is the
    query head width d, site.channels_out the value head width."""

    def __init__(self, config: "PrefixConfig", site: Site):
        super().__init__()
        heads, length = site.heads, config.length
        self.key_shape = (*heads, length, site.channels_in)
        self.value_shape = (*heads, length, site.channels_out)
        self.scale = site.channels_in ** -0.5
        if config.reparam_hidden:  # a small MLP produces K_p and V_p from a prefix embedding
            width = math.prod(heads) * site.channels_in
            self.embedding = nn.Parameter(torch.randn(length, width) * width ** -0.5)
            out = nn.Linear(config.reparam_hidden, math.prod(self.key_shape[:-2]) * (site.channels_in + site.channels_out))
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            self.reparam = nn.Sequential(nn.Linear(width, config.reparam_hidden), nn.Tanh(), out)
        else:
            self.keys = nn.Parameter(torch.randn(self.key_shape) * self.scale)
            self.values = nn.Parameter(torch.zeros(self.value_shape))
            self.reparam = None

    def _keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reparam is None:
            return self.keys, self.values
        heads, length = self.key_shape[:-2], self.key_shape[-2]
        keys, values = self.reparam(self.embedding).split(
            [math.prod(heads) * self.key_shape[-1], math.prod(heads) * self.value_shape[-1]], dim=-1)
        keys = keys + self.embedding  # the embedding itself is the key at init; values start at zero

        def to_heads(t: torch.Tensor, width: int) -> torch.Tensor:
            return t.reshape(length, *heads, width).movedim(0, -2)
        return to_heads(keys, self.key_shape[-1]), to_heads(values, self.value_shape[-1])

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        keys, values = self._keys_values()
        weights = torch.softmax((query @ keys.transpose(-2, -1)) * self.scale, dim=-1)
        return weights @ values


@register_tuner("prefix", positions=("prefix",), module=ParallelPrefix)
@dataclass
class PrefixConfig(TunerConfig):
    """Learnable keys and values K_p, V_p concatenated to an attention's K and V."""

    length: int = field(default=10, metadata={"help": "number of prefix tokens"})
    reparam_hidden: int = field(default=0, metadata={"help": "hidden width of a reparameterisation MLP, 0 for none"})
    parallel: bool = field(default=True, metadata={"help": "Res-Tuning's parallel form Attn(Q,K,V) + Attn(Q,K_p,V_p) "
                                                              "(true), or keys and values concatenated (false)"})

    def __post_init__(self) -> None:
        check_positive_int("length", self.length)
        check(isinstance(self.reparam_hidden, int) and self.reparam_hidden >= 0,
              f"reparam_hidden must be 0 or a positive integer, got {self.reparam_hidden!r}")
        check(isinstance(self.parallel, bool), f"parallel must be true or false, got {self.parallel!r}")

    def added_parameters(self, size: RegionSize) -> int:
        channels = size.channels_in
        if not self.reparam_hidden:
            return 2 * self.length * channels
        mlp = channels * self.reparam_hidden + self.reparam_hidden + self.reparam_hidden * 2 * channels + 2 * channels
        return self.length * channels + mlp


@register_tuner("prompt", positions=("prompt",))
@dataclass
class PromptConfig(TunerConfig):
    """VPT: learnable tokens inserted after the class token (shallow) or replaced before every block (deep)."""

    length: int = field(default=10, metadata={"help": "number of prompt tokens"})
    deep: bool = field(default=False, metadata={"help": "new tokens before every selected block (VPT-deep)"})

    def __post_init__(self) -> None:
        check_positive_int("length", self.length)
        check(isinstance(self.deep, bool), f"deep must be true or false, got {self.deep!r}")

    def added_parameters(self, size: RegionSize) -> int:
        return self.length * size.channels_in
