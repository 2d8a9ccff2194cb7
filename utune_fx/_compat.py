"""Compatibility with the torchvision wheel the registry serves beside CPU torch.

The only torchvision release that accepts torch 2.13.0 (0.28.0) is a CUDA build.
Its compiled ops library (``torchvision/_C``) cannot load against CPU torch, so
torchvision silently runs without its ops -- until ``_meta_registrations``
registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms``, which
needs the op *schemas* and raises ``operator torchvision::nms does not exist``.
timm imports torchvision, so ``import timm`` fails the same way.

:func:`ensure_torchvision_importable` runs before anything imports torchvision.
It loads the compiled library exactly as torchvision would; only when that
fails does it define the two schemas, so torchvision's import succeeds (its
detection ops stay unavailable, which utune_fx never needs). Where torchvision
imports normally -- a matching CPU build, a CUDA machine, or no torchvision at
all -- it does nothing.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import torch

# The schemas torchvision's _meta_registrations.py needs at import time.
_MISSING_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# A Library frees its definitions when garbage collected: keep it alive.
_library: torch.library.Library | None = None


def _compiled_ops_loadable() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # no torchvision: nothing to fix
    package_dir = Path(spec.origin).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        library = package_dir / f"_C{suffix}"
        if library.exists():
            try:
                torch.ops.load_library(str(library))
                return True
            except OSError:
                return False
    return False


def ensure_torchvision_importable() -> bool:
    """Make ``import torchvision`` work; returns True if schemas were defined here."""
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return False
    if _compiled_ops_loadable() or hasattr(torch.ops.torchvision, "nms"):
        return False
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _MISSING_SCHEMAS:
        _library.define(schema)
    return True
