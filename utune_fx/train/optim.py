"""Optimizer and schedule over the trainable parameters only.

groups:   decay    = weights of tuner/selected layers
          no_decay = biases, norm weights, prompt/prefix tokens, gates (1-D or token tensors)
schedule: linear warm-up to lr over warmup steps, then cosine to 0 (per optimizer step)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from utune_fx.train.config import TrainConfig

_NO_DECAY_NAMES = ("bias", "tokens", "keys", "values", "embedding", "gate")


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        last = name.rsplit(".", 1)[-1]
        is_norm = isinstance(_owner(module, name), (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm))
        (no_decay if parameter.dim() <= 1 or last in _NO_DECAY_NAMES or is_norm else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _owner(module: nn.Module, name: str) -> nn.Module | None:
    path = name.rpartition(".")[0]
    try:
        return module.get_submodule(path) if path else module
    except AttributeError:
        return None


def create_optimizer(module: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(module, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=config.lr)


def create_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
