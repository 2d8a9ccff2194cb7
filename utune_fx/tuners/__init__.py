"""Tuner registry: one config dataclass per tuner, registered with one call.

    @register_tuner("lora", positions=("reparameterised",), module=LoraBranch)
    @dataclass
    class LoraConfig(TunerConfig):
        rank: int = field(default=8, metadata={"help": "rank r of B @ A"})
        ...

One file per family (adapters, lora, scale_shift, prefix, prompts, existing) holds
each config next to its nn.Module, built as ``module(config, site)``. The
rule loader checks tuner names and settings against this registry (unknown
names list the valid ones; a bad setting names the field and its help text),
``cli.py match`` asks each config how many parameters it would add, and the
rewriter builds the modules. Tuners without a module (bitfit, head, full)
make existing parameters trainable.

Every registered config is checked for sane numbers before its own checks
run (:func:`check_settings`): no NaN or infinity in any setting, floats of a
moderate magnitude, integer sizes (rank, hidden, length, num_classes, ...)
under an absolute cap. The caps are in :mod:`utune_fx.match.limits`; the
bounds relative to a region's channels come at match time.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

POSITIONS = ("parallel", "sequential", "prompt", "prefix", "reparameterised", "bypass", "none")


@dataclass(frozen=True)
class RegionSize:
    """What a tuner's size depends on, read off a matched region."""

    channels_in: int  # channels of the region's input (last axis of tokens, axis 1 of NCHW maps)
    channels_out: int
    fan_in: int = 0  # weight elements per output channel of a single linear/conv (LoRA's A)
    groups: int = 1  # groups of that conv (depthwise: one per channel)
    biases: int = 0  # bias elements inside the region (BitFit)
    weights: int = 0  # all parameter elements inside the region (head, full tuning)
    heads: int = 0  # attention heads inside the region (gates of prefixes and prompts)
    position: int = 0  # place among the rule's regions (shallow prompts are made once)
    previous_out: int = 0  # channels_out of the rule's previous region (0 for the first): a bypass's side state
    last: bool = False  # the rule's last region (a bypass joins the backbone there)


@dataclass(frozen=True)
class ConvGeometry:
    """What LoRA copies from the convolution it reparameterises."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    kind: str = "conv"
    groups: int = 1
    transposed: bool = False  # nn.ConvTranspose: A is transposed like the conv, B stays 1x1
    output_padding: tuple[int, ...] = ()


@dataclass(frozen=True)
class EmbeddingTable:
    """What LoRA copies from the embedding it reparameterises: the padding row, whose lookups train
    nothing (PEFT's lora.Embedding passes it on as well)."""

    padding_idx: int | None = None
    kind: str = "embedding"


@dataclass(frozen=True)
class AttentionForm:
    """How the attention a prefix or prompt joins is computed, so the tuner can repeat it
    with more keys: ``sdpa`` (F.scaled_dot_product_attention with this scale and causality)
    or ``logits`` (written out: the tuner reads the softmax's input, and the queries as the
    QK^T matmul reads them; scale: the constant factors between that matmul and the softmax)."""

    kind: str  # "sdpa" | "logits"
    scale: float | None = None
    causal: bool = False


@dataclass(frozen=True)
class Site:
    """Where one tuner instance goes: what its module is built for."""

    channels_in: int
    channels_out: int
    rank: int  # rank of the tensor the tuner reads/writes
    channels_first: bool  # [B, C, H, W] feature maps rather than [..., C] tokens
    target: ConvGeometry | EmbeddingTable | None = None  # for LoRA on a convolution or an embedding
    stride: tuple[int, ...] | None = None  # feature maps the region downsamples (a strided W_down)
    heads: tuple[int, ...] = ()  # attention tuners: head dims between batch and tokens ([B, H, N, D] -> (H,))
    attention: AttentionForm | None = None  # concatenated prefixes and prompts


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_dropout(value: float) -> None:
    check(isinstance(value, (int, float)) and 0.0 <= value < 1.0, f"dropout must be in [0, 1), got {value!r}")


def check_positive_int(name: str, value: object) -> None:
    check(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{name} must be a positive integer, got {value!r}",
    )


def _is_size(setting: dataclasses.Field) -> bool:
    """An integer setting (rank, hidden, length, num_classes): its annotation names int, not float."""
    words = set(re.findall(r"[A-Za-z_]\w*", str(setting.type)))
    return "int" in words and "float" not in words


def check_settings(config: TunerConfig) -> None:
    """What every tuner's settings must be, whatever the tuner: finite numbers of a moderate
    magnitude, integer sizes under the absolute cap. Raises ValueError naming the setting."""
    from utune_fx.match.limits import TUNER_NUMBER, TUNER_SIZE  # here: match imports this registry

    for setting in dataclasses.fields(config):
        value = getattr(config, setting.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{setting.name} must be a finite number, got {value!r}")
        if _is_size(setting):
            check(
                not isinstance(value, int) or value <= TUNER_SIZE.value(),
                f"{setting.name} is {value:,}, too large for any tuner; {TUNER_SIZE.advice()}",
            )
        elif abs(value) > TUNER_NUMBER.value():
            raise ValueError(f"{setting.name} is {value:g}, too large in magnitude; {TUNER_NUMBER.advice()}")


@dataclass
class TunerConfig(abc.ABC):
    """Base of every tuner config; subclasses validate in __post_init__, after :func:`check_settings`
    (register_tuner sees to that)."""

    def __post_init__(self) -> None:
        check_settings(self)

    @abc.abstractmethod
    def added_parameters(self, size: RegionSize) -> int:
        """New trainable parameters this tuner adds to one region."""

    def trained_parameters(self, size: RegionSize) -> int:
        """Existing parameters of the region this tuner makes trainable."""
        return 0


@dataclass(frozen=True)
class TunerEntry:
    name: str
    config: type[TunerConfig]
    positions: tuple[str, ...]  # the first is the default
    module: Callable[[TunerConfig, Site], Any] | None  # None: trains existing parameters

    def fields(self) -> dict[str, str]:
        """setting name -> help text"""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(self.config)}


TUNERS: dict[str, TunerEntry] = {}


def register_tuner(name: str, *, positions: tuple[str, ...], module: Callable | None = None) -> Callable[[type], type]:
    def decorate(config: type) -> type:
        if name in TUNERS:
            raise ValueError(f"tuner {name!r} is registered twice")
        if inspect.isabstract(config):
            raise TypeError(f"{config.__name__} must define added_parameters")
        unknown = set(positions) - set(POSITIONS)
        if unknown or not positions:
            raise ValueError(f"tuner {name!r}: positions must be from {POSITIONS}")
        own_checks = config.__post_init__
        if own_checks is not TunerConfig.__post_init__:  # its own checks replace the base's: run both

            @functools.wraps(own_checks)
            def post_init(self: TunerConfig) -> None:
                check_settings(self)
                own_checks(self)

            config.__post_init__ = post_init
        TUNERS[name] = TunerEntry(name, config, positions, module)
        return config

    return decorate


def create_config(name: str, settings: dict[str, Any]) -> TunerConfig:
    """Build a tuner's config; TypeError/ValueError say what is wrong."""
    entry = TUNERS[name]
    return entry.config(**settings)


# Registers the tuners (after the registry exists).
from utune_fx.tuners import adapters, bypass, existing, lora, prefix, prompts, scale_shift  # noqa: E402,F401
