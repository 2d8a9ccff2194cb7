"""Tuners that insert nothing: they make existing parameters trainable.

bitfit: the biases inside the regions      head: the classifier (optionally re-sized)
full:   every parameter inside the regions (the full fine-tuning baseline)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from utune_fx.tuners import RegionSize, TunerConfig, check_positive_int, register_tuner


@dataclass
class _NothingAdded(TunerConfig):
    def added_parameters(self, size: RegionSize) -> int:
        return 0


@register_tuner("bitfit", positions=("none",))
@dataclass
class BitFitConfig(_NothingAdded):
    """BitFit: the biases inside the region train; nothing is inserted."""

    def trained_parameters(self, size: RegionSize) -> int:
        return size.biases


@register_tuner("head", positions=("none",))
@dataclass
class HeadConfig(TunerConfig):
    """The classifier trains, optionally re-sized to num_classes (linear probe)."""

    num_classes: int | None = field(default=None, metadata={"help": "re-size the classifier to this many classes"})

    def __post_init__(self) -> None:
        if self.num_classes is not None:
            check_positive_int("num_classes", self.num_classes)

    def added_parameters(self, size: RegionSize) -> int:
        return (size.channels_in + 1) * self.num_classes if self.num_classes else 0

    def trained_parameters(self, size: RegionSize) -> int:
        return 0 if self.num_classes else size.weights


@register_tuner("full", positions=("none",))
@dataclass
class FullConfig(_NothingAdded):
    """Full fine-tuning of the region: every parameter inside it trains."""

    def trained_parameters(self, size: RegionSize) -> int:
        return size.weights
