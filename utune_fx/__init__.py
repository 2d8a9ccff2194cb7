"""utune_fx: structure-targeted parameter-efficient tuning on torch.fx graphs."""

from importlib import metadata

from utune_fx._compat import ensure_torchvision_importable

try:
    __version__ = metadata.version("utune_fx")  # pyproject.toml's version, the one source of truth
except metadata.PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"

ensure_torchvision_importable()  # before anything imports timm/torchvision

# The package utune_fx.fold and the function utune_fx.fold share a name: the package is imported first,
# so that importing it later (``from utune_fx.fold import ...``) no longer sets the attribute.
import utune_fx.fold  # noqa: E402, F401
from utune_fx.api import (  # noqa: E402  (after the compatibility shim)
    fold,
    load_tuners,
    print_trainable_parameters,
    save_tuners,
    trainable_parameters,
    tune,
)

__all__ = ["fold", "load_tuners", "print_trainable_parameters", "save_tuners", "trainable_parameters", "tune"]
