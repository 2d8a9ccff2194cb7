"""Token tuners: prompts (VPT) and prefixes on attention keys and values.

Their settings are checked by the rule loader and ``cli.py match`` counts
their parameters; the rewriter's prompt and prefix positions come next (see
the open rewriter issue), so a rewrite that needs one says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from utune_fx.tuners import RegionSize, TunerConfig, check, check_positive_int, register_tuner


@register_tuner("prefix", positions=("prefix",))
@dataclass
class PrefixConfig(TunerConfig):
    """Learnable keys and values K_p, V_p concatenated to an attention's K and V."""

    length: int = field(default=10, metadata={"help": "number of prefix tokens"})
    reparam_hidden: int = field(default=0, metadata={"help": "hidden width of a reparameterisation MLP, 0 for none"})
    parallel: bool = field(default=False, metadata={"help": "Res-Tuning's parallel form (1-l) Attn(Q,K,V) + l Attn(Q,K_p,V_p)"})

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
