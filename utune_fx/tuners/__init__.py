"""Tuner registry: one config dataclass per tuner, registered with one call.

    @register_tuner("lora", positions=("reparameterised",))
    @dataclass
    class LoraConfig(TunerConfig):
        rank: int = field(default=8, metadata={"help": "rank r of B @ A"})
        ...

The rule loader checks tuner names and settings against this registry
(unknown names list the valid ones; a bad setting names the field and its
help text), and ``cli.py match`` asks each config how many parameters it
would add to a region. The modules that implement the tuners come with the
rewriter.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable

POSITIONS = ("parallel", "sequential", "prompt", "prefix", "reparameterised", "none")


@dataclass(frozen=True)
class RegionSize:
    """What a tuner's size depends on, read off a matched region."""

    channels_in: int  # channels of the region's input (last axis of tokens, axis 1 of NCHW maps)
    channels_out: int
    fan_in: int = 0  # weight elements per output channel of a single linear/conv (LoRA's A)
    biases: int = 0  # bias elements inside the region (BitFit)
    weights: int = 0  # all parameter elements inside the region (head, full tuning)


@dataclass
class TunerConfig(abc.ABC):
    """Base of every tuner config; subclasses validate in __post_init__."""

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

    def fields(self) -> dict[str, str]:
        """setting name -> help text"""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(self.config)}


TUNERS: dict[str, TunerEntry] = {}


def register_tuner(name: str, *, positions: tuple[str, ...]) -> Callable[[type], type]:
    def decorate(config: type) -> type:
        if name in TUNERS:
            raise ValueError(f"tuner {name!r} is registered twice")
        if inspect.isabstract(config):
            raise TypeError(f"{config.__name__} must define added_parameters")
        unknown = set(positions) - set(POSITIONS)
        if unknown or not positions:
            raise ValueError(f"tuner {name!r}: positions must be from {POSITIONS}")
        TUNERS[name] = TunerEntry(name, config, positions)
        return config
    return decorate


def create_config(name: str, settings: dict[str, Any]) -> TunerConfig:
    """Build a tuner's config; TypeError/ValueError say what is wrong."""
    entry = TUNERS[name]
    return entry.config(**settings)


from utune_fx.tuners import configs as _configs  # noqa: E402,F401  (registers the tuners)
