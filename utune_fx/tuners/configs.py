"""The tuners of U-Tuning and the methods it unifies: their settings.

One dataclass each, validated in ``__post_init__``, help text in field
metadata (shown by the rule loader's errors and docs/rules.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from utune_fx.tuners import RegionSize, TunerConfig, register_tuner

ACTIVATIONS = ("relu", "gelu", "silu", "identity")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_dropout(value: float) -> None:
    _check(isinstance(value, (int, float)) and 0.0 <= value < 1.0, f"dropout must be in [0, 1), got {value!r}")


def _check_positive_int(name: str, value: object) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
           f"{name} must be a positive integer, got {value!r}")


@register_tuner("parallel_adapter", positions=("parallel",))
@dataclass
class ParallelAdapterConfig(TunerConfig):
    """The U-Tuner: x' = OP(x) + s * W_up(act(W_down(x))), W_up zero-initialised."""

    hidden: int = field(default=8, metadata={"help": "bottleneck width of W_down / W_up"})
    activation: str = field(default="relu", metadata={"help": f"one of {', '.join(ACTIVATIONS)}"})
    scale: float | str = field(default=1.0, metadata={"help": "fixed scale s, or 'learned'"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the bottleneck, in [0, 1)"})

    def __post_init__(self) -> None:
        _check_positive_int("hidden", self.hidden)
        _check(self.activation in ACTIVATIONS, f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        _check(self.scale == "learned" or isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool),
               f"scale must be a number or 'learned', got {self.scale!r}")
        _check_dropout(self.dropout)

    def added_parameters(self, size: RegionSize) -> int:
        down = size.channels_in * self.hidden + self.hidden
        up = self.hidden * size.channels_out + size.channels_out
        return down + up + (1 if self.scale == "learned" else 0)


@register_tuner("sequential_adapter", positions=("sequential",))
@dataclass
class SequentialAdapterConfig(TunerConfig):
    """Houlsby/Pfeiffer adapter on OP's output: x' = OP(x) + W_up(act(W_down(OP(x))))."""

    hidden: int = field(default=8, metadata={"help": "bottleneck width"})
    activation: str = field(default="relu", metadata={"help": f"one of {', '.join(ACTIVATIONS)}"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the bottleneck, in [0, 1)"})

    def __post_init__(self) -> None:
        _check_positive_int("hidden", self.hidden)
        _check(self.activation in ACTIVATIONS, f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        _check_dropout(self.dropout)

    def added_parameters(self, size: RegionSize) -> int:
        return 2 * size.channels_out * self.hidden + self.hidden + size.channels_out


@register_tuner("lora", positions=("reparameterised",))
@dataclass
class LoraConfig(TunerConfig):
    """LoRA on a linear or conv: W x + (alpha / rank) * B(A(x)), A kaiming-uniform, B zero."""

    rank: int = field(default=8, metadata={"help": "rank r of the update B @ A"})
    alpha: float = field(default=16.0, metadata={"help": "the update is scaled by alpha / rank"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the input of A, in [0, 1)"})

    def __post_init__(self) -> None:
        _check_positive_int("rank", self.rank)
        _check(isinstance(self.alpha, (int, float)) and self.alpha > 0, f"alpha must be positive, got {self.alpha!r}")
        _check_dropout(self.dropout)

    def added_parameters(self, size: RegionSize) -> int:
        return self.rank * ((size.fan_in or size.channels_in) + size.channels_out)


@register_tuner("prefix", positions=("prefix",))
@dataclass
class PrefixConfig(TunerConfig):
    """Learnable keys and values K_p, V_p concatenated to an attention's K and V."""

    length: int = field(default=10, metadata={"help": "number of prefix tokens"})
    reparam_hidden: int = field(default=0, metadata={"help": "hidden width of a reparameterisation MLP, 0 for none"})
    parallel: bool = field(default=False, metadata={"help": "Res-Tuning's parallel form (1-l) Attn(Q,K,V) + l Attn(Q,K_p,V_p)"})

    def __post_init__(self) -> None:
        _check_positive_int("length", self.length)
        _check(isinstance(self.reparam_hidden, int) and self.reparam_hidden >= 0,
               f"reparam_hidden must be 0 or a positive integer, got {self.reparam_hidden!r}")
        _check(isinstance(self.parallel, bool), f"parallel must be true or false, got {self.parallel!r}")

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
        _check_positive_int("length", self.length)
        _check(isinstance(self.deep, bool), f"deep must be true or false, got {self.deep!r}")

    def added_parameters(self, size: RegionSize) -> int:
        return self.length * size.channels_in


@register_tuner("scale_shift", positions=("sequential",))
@dataclass
class ScaleShiftConfig(TunerConfig):
    """SSF / IA3: x' = OP(x) * (1 + g) + b per channel, foldable."""

    shift: bool = field(default=True, metadata={"help": "also learn the shift b (IA3 has none)"})

    def __post_init__(self) -> None:
        _check(isinstance(self.shift, bool), f"shift must be true or false, got {self.shift!r}")

    def added_parameters(self, size: RegionSize) -> int:
        return size.channels_out * (2 if self.shift else 1)


@register_tuner("bitfit", positions=("none",))
@dataclass
class BitFitConfig(TunerConfig):
    """BitFit: the biases inside the region train; nothing is inserted."""

    def added_parameters(self, size: RegionSize) -> int:
        return 0

    def trained_parameters(self, size: RegionSize) -> int:
        return size.biases


@register_tuner("head", positions=("none",))
@dataclass
class HeadConfig(TunerConfig):
    """The classifier trains, optionally re-sized to num_classes (linear probe)."""

    num_classes: int | None = field(default=None, metadata={"help": "re-size the classifier to this many classes"})

    def __post_init__(self) -> None:
        if self.num_classes is not None:
            _check_positive_int("num_classes", self.num_classes)

    def added_parameters(self, size: RegionSize) -> int:
        return (size.channels_in + 1) * self.num_classes if self.num_classes else 0

    def trained_parameters(self, size: RegionSize) -> int:
        return 0 if self.num_classes else size.weights


@register_tuner("full", positions=("none",))
@dataclass
class FullConfig(TunerConfig):
    """Full fine-tuning of the region: every parameter inside it trains."""

    def added_parameters(self, size: RegionSize) -> int:
        return 0

    def trained_parameters(self, size: RegionSize) -> int:
        return size.weights
