"""utune_fx: structure-targeted parameter-efficient tuning on torch.fx graphs."""

from utune_fx._compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before anything imports timm/torchvision
