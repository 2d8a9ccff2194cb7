"""--device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine before any work.

check_device("cuda:1")  -> None, or one UtuneError line (bad spelling, no CUDA, N out of range)
resolve_device("auto")  -> torch.device("cuda") when CUDA is present, else cpu
"""

from __future__ import annotations

import re

import torch

from utune_fx.errors import UtuneError

_DEVICE = re.compile(r"auto|cpu|cuda(?::(\d{1,4}))?")


def check_device(text: str) -> None:
    """Refuse a device this machine cannot run on, in one line (before a model is built or data read)."""
    found = _DEVICE.fullmatch(text) if isinstance(text, str) else None
    if found is None:
        raise UtuneError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}")
    if not text.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise UtuneError(
            f"--device {text}: this machine has no usable CUDA device (torch {torch.__version__} is {build}); "
            "use --device cpu or auto"
        )
    index, count = found.group(1), torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise UtuneError(
            f"--device {text}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
            f"(cuda:0 to cuda:{count - 1}); choose one of them"
        )


def resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(text)
    return torch.device(text)
