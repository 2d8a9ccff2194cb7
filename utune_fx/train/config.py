"""Training settings: one dataclass, validated on creation, help text in field metadata
(the CLI builds its options from it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from utune_fx.errors import UtuneError
from utune_fx.train.devices import check_device

MAX_EPOCHS = 1_000_000  # the most a checkpoint records (schemas/checkpoint.schema.json)
MAX_WORKERS = 256  # data loader processes; more only exhausts the machine
MAX_SEED = 2**32 - 1  # seeds feed torch and numpy generators, which take 64 (numpy: 32) bits


@dataclass
class TrainConfig:
    epochs: int = field(default=10, metadata={"help": "passes over the training images"})
    batch_size: int = field(
        default=32,
        metadata={"help": "images per optimizer step (before accumulation); under torchrun the global batch"},
    )
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or sgd (momentum 0.9)"})
    weight_decay: float = field(
        default=0.05, metadata={"help": "decoupled weight decay; never on norms, biases, prompt/prefix tokens or gates"}
    )
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up before the cosine decay"})
    label_smoothing: float = field(default=0.1, metadata={"help": "cross-entropy label smoothing"})
    accumulate: int = field(default=1, metadata={"help": "batches per optimizer step (gradient accumulation)"})
    clip_grad: float = field(default=1.0, metadata={"help": "max gradient norm; 0 for none"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when present), cuda, cuda:N, cpu"})
    precision: str = field(
        default="auto", metadata={"help": "auto (bf16 autocast on CUDA, float32 on CPU), bf16 or fp32"}
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (CUDA)"})
    workers: int = field(default=0, metadata={"help": "data loader worker processes"})
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "under torchrun: shard the frozen weights over the processes (FSDP2) instead of copying "
            "the model to each (DDP); the tuners stay whole on every process"
        },
    )
    cache_features: bool = field(
        default=False,
        metadata={
            "help": "compute the frozen part of the model once per image and train the rest from that cache "
            "(needs --no-augment; docs/train.md)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seeds the data order, augmentation and tuner dropout"})

    def __post_init__(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "accumulate": self.accumulate}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise UtuneError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        numbers = {
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "warmup_epochs": self.warmup_epochs,
            "label_smoothing": self.label_smoothing,
            "clip_grad": self.clip_grad,
        }
        for name, value in numbers.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UtuneError(f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise UtuneError(f"--lr must be positive, got {self.lr!r}")
        if not 0 <= self.label_smoothing < 1:
            raise UtuneError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing!r}")
        bounded = {
            "epochs": (self.epochs, MAX_EPOCHS),
            "workers": (self.workers, MAX_WORKERS),
            "seed": (self.seed, MAX_SEED),
        }
        for name, (value, most) in bounded.items():
            if not isinstance(value, int) or value > most:
                raise UtuneError(f"--{name} must be an integer of at most {most}, got {value!r}")
        choices = {
            "optimizer": ("adamw", "sgd"),
            "precision": ("auto", "bf16", "fp32"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UtuneError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.weight_decay < 0 or self.clip_grad < 0 or self.warmup_epochs < 0 or self.workers < 0 or self.seed < 0:
            raise UtuneError("--weight-decay, --clip-grad, --warmup-epochs, --workers and --seed must not be negative")
        check_device(self.device)  # an unusable device is refused here, before any model or data work

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}
