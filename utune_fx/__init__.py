"""utune_fx: structure-targeted parameter-efficient tuning on torch.fx graphs."""

from importlib import metadata

from utune_fx._compat import ensure_torchvision_importable

try:
    __version__ = metadata.version("utune_fx")  # pyproject.toml's version, the one source of truth
except metadata.PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"

ensure_torchvision_importable()  # before anything imports timm/torchvision
