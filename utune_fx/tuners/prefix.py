"""Prefix tuning: learnable keys and values K_p, V_p joined to an attention's K and V.

    parallel form (Res-Tuning, arXiv 2310.19859: the prefix unbound from the frozen attention):
        out' = Attn(Q, K, V) + softmax(Q K_p^T / sqrt(d)) V_p             V_p zero at init
    concatenated form (Li & Liang 2021), gated:
        out' = Attn(Q, K, V) + g * (Attn(Q, [K; K_p], [V; V_p]) - Attn(Q, K, V))
             = Attn(Q, K, V) + g * l * (Attn(Q, K_p, V_p) - Attn(Q, K, V))
    with l the softmax mass on the prefix and g a per-head gate that starts at 0.

The classic concatenated prefix (g = 1) moves softmax mass to the new keys, so
it cannot start as the frozen model; the zero gate (LLaMA-Adapter's
zero-initialised attention) keeps that promise and reaches the classic form at
g = 1. The gate's gradient at init, l * (Attn(Q, K_p, V_p) - Attn(Q, K, V)), is
not zero, so training leaves the start at once. ``GatedConcatAttention`` is
shared with the prompts (VPT), whose keys and values come from prompt tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from utune_fx.tuners import RegionSize, Site, TunerConfig, check, check_positive_int, register_tuner


class GatedConcatAttention(nn.Module):
    """g * (Attn(Q, [K; K_p], [V; V_p]) - out) for one attention, g per head starting at 0.

    ``extra`` is the attention mask of an sdpa call, or the softmax input (logits after
    scaling, bias and masks) of a written-out attention. Extra keys get no bias or mask.
    """

    def __init__(self, site: Site):
        super().__init__()
        if site.attention is None:
            raise ValueError("GatedConcatAttention needs the site's attention form")
        self.form = site.attention
        self.gate = nn.Parameter(torch.zeros(*site.heads, 1, 1))
        self.scale = site.attention.scale if site.attention.scale is not None else site.channels_in**-0.5

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        output: torch.Tensor,
        extra: torch.Tensor | None,
        prefix_keys: torch.Tensor,
        prefix_values: torch.Tensor,
        scale: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``scale``: a factor of the logits the frozen graph computes itself (times the site's)."""
        if prefix_keys.dim() == key.dim() and prefix_keys.shape[0] not in (1, key.shape[0]):
            windows = key.shape[0] // prefix_keys.shape[0]  # [B, ...] prompts for [B * windows, ...] keys
            prefix_keys, prefix_values = (t.repeat_interleave(windows, 0) for t in (prefix_keys, prefix_values))
        prefix_keys = prefix_keys.to(key.dtype).expand(*key.shape[:-2], *prefix_keys.shape[-2:])
        prefix_values = prefix_values.to(value.dtype).expand(*value.shape[:-2], *prefix_values.shape[-2:])
        keys, values = torch.cat([key, prefix_keys], dim=-2), torch.cat([value, prefix_values], dim=-2)
        if self.form.kind == "sdpa":
            mask = self._mask(query, key, extra, prefix_keys.shape[-2])
            joined = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=self.form.scale)
        else:
            prefix_logits = (query @ prefix_keys.transpose(-2, -1)) * (
                self.scale if scale is None else self.scale * scale
            )
            logits = torch.cat([extra.expand(*prefix_logits.shape[:-1], extra.shape[-1]), prefix_logits], dim=-1)
            joined = torch.softmax(logits, dim=-1).to(values.dtype) @ values
        return self.gate.to(output.dtype) * (joined - output)

    def _mask(
        self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, length: int
    ) -> torch.Tensor | None:
        """The frozen call's mask (or causality) over the real keys; the prefix is open to every query."""
        if self.form.causal:
            mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        if mask is None:
            return None
        mask = mask.expand(*mask.shape[:-1], key.shape[-2])  # a mask may broadcast over the keys
        fill = torch.ones if mask.dtype == torch.bool else torch.zeros
        return torch.cat([mask, fill(*mask.shape[:-1], length, dtype=mask.dtype, device=mask.device)], dim=-1)


class _PrefixTokens(nn.Module):
    """K_p, V_p of shape [*heads, length, d]: free tensors, or made by a small MLP (Li & Liang's
    reparameterisation, which becomes constant tensors once trained)."""

    def __init__(self, config: PrefixConfig, site: Site, zero_values: bool):
        super().__init__()
        heads, length = site.heads, config.length
        self.key_shape = (*heads, length, site.channels_in)
        self.value_shape = (*heads, length, site.channels_out)
        scale = site.channels_in**-0.5
        if config.reparam_hidden:
            width = math.prod(heads) * site.channels_in
            self.embedding = nn.Parameter(torch.randn(length, width) * width**-0.5)
            out = nn.Linear(config.reparam_hidden, math.prod(heads) * (site.channels_in + site.channels_out))
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            self.reparam = nn.Sequential(nn.Linear(width, config.reparam_hidden), nn.Tanh(), out)
        else:
            self.keys = nn.Parameter(torch.randn(self.key_shape) * scale)
            values = torch.zeros(self.value_shape) if zero_values else torch.randn(self.value_shape) * scale
            self.values = nn.Parameter(values)
            self.reparam = None

    def freeze(self) -> None:
        """Replace the parameters (and the MLP) by the keys and values they make, as buffers."""
        with torch.no_grad():
            keys, values = (t.detach().clone() for t in self.keys_values())
        for name in ("keys", "values", "embedding", "reparam"):
            if hasattr(self, name):
                delattr(self, name)
        self.register_buffer("keys", keys)
        self.register_buffer("values", values)
        self.reparam = None

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reparam is None:
            return self.keys, self.values
        heads, length = self.key_shape[:-2], self.key_shape[-2]
        keys, values = self.reparam(self.embedding).split(
            [math.prod(heads) * self.key_shape[-1], math.prod(heads) * self.value_shape[-1]], dim=-1
        )
        keys = keys + self.embedding  # the embedding itself is the key at init; values start at zero

        def to_heads(t: torch.Tensor, width: int) -> torch.Tensor:
            return t.reshape(length, *heads, width).movedim(0, -2)

        return to_heads(keys, self.key_shape[-1]), to_heads(values, self.value_shape[-1])


class ParallelPrefix(_PrefixTokens):
    """softmax(Q K_p^T / sqrt(d)) V_p for queries [B, *heads, N, d]; site.channels_in is the
    query head width d, site.channels_out the value head width."""

    def __init__(self, config: PrefixConfig, site: Site):
        super().__init__(config, site, zero_values=True)
        form = site.attention
        self.scale = form.scale if form is not None and form.scale is not None else site.channels_in**-0.5

    def forward(self, query: torch.Tensor, scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """``query`` as the attention's QK^T reads it; ``scale``: a factor the graph computes."""
        keys, values = self.keys_values()
        logits = (query @ keys.transpose(-2, -1)) * (self.scale if scale is None else self.scale * scale)
        return torch.softmax(logits, dim=-1) @ values


class ConcatPrefix(_PrefixTokens):
    """The gated concatenated prefix: reads Q, K, V, the attention's output and its mask/logits."""

    def __init__(self, config: PrefixConfig, site: Site):
        super().__init__(config, site, zero_values=False)
        self.attend = GatedConcatAttention(site)

    def forward(self, query, key, value, output, extra=None, scale=None) -> torch.Tensor:
        return self.attend(query, key, value, output, extra, *self.keys_values(), scale)


def build_prefix(config: PrefixConfig, site: Site) -> nn.Module:
    return (ParallelPrefix if config.parallel else ConcatPrefix)(config, site)


@register_tuner("prefix", positions=("prefix",), module=build_prefix)
@dataclass
class PrefixConfig(TunerConfig):
    """Learnable keys and values K_p, V_p joined to an attention's K and V."""

    length: int = field(default=10, metadata={"help": "number of prefix tokens"})
    reparam_hidden: int = field(default=0, metadata={"help": "hidden width of a reparameterisation MLP, 0 for none"})
    parallel: bool = field(
        default=True,
        metadata={
            "help": "Res-Tuning's parallel form Attn(Q,K,V) + Attn(Q,K_p,V_p) "
            "(true), or keys and values concatenated behind a "
            "zero-initialised gate (false)"
        },
    )

    def __post_init__(self) -> None:
        check_positive_int("length", self.length)
        check(
            isinstance(self.reparam_hidden, int) and self.reparam_hidden >= 0,
            f"reparam_hidden must be 0 or a positive integer, got {self.reparam_hidden!r}",
        )
        check(isinstance(self.parallel, bool), f"parallel must be true or false, got {self.parallel!r}")

    def added_parameters(self, size: RegionSize) -> int:
        channels = size.channels_in
        gates = 0 if self.parallel else size.heads
        if not self.reparam_hidden:
            return 2 * self.length * channels + gates
        mlp = channels * self.reparam_hidden + self.reparam_hidden + self.reparam_hidden * 2 * channels + 2 * channels
        return self.length * channels + mlp + gates
