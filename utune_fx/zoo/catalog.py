"""Which timm models the sweep runs: one per architecture family, and the fixed CI sample.

    families()  -> ["beit_base_patch16_224", "botnet26t_256", ...]   (one name per family)

A family is a timm module and the first word of the model name (``vision_transformer`` /
``vit``, ``vision_transformer`` / ``deit``, ``byobnet`` / ``gernet``, ...): 1,371 names in
timm 1.0.31 fall into 191 families. Each family is represented by its smallest member by
parameter count (counted on the meta device, so nothing is allocated), which is what keeps the
whole sweep within about two hours on 2 cores.
"""

from __future__ import annotations

import re

import torch

import utune_fx  # noqa: F401  (before timm)

# CI's fixed sample: every kind of network the machinery must handle, each fast on 2 cores. 8 since
# the transformers and torchvision samples joined CI (30 before; CI must stay within 15 minutes): plain
# ViT, windowed attention, two hybrids (conv + attention), an MLP mixer, CNNs with and without residual
# blocks; the families left out (BEiT, DeiT, EVA-02, XCiT, CrossViT, FastViT, LeViT, MobileViT,
# EfficientFormer, EfficientNet, MobileNetV3, Inception, ...) run in the full sweep, and rotary/SwiGLU
# transformers in the transformers sample (Llama)
CI_SAMPLE = (
    "vit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "coatnet_nano_rw_224",
    "mixer_s32_224",
    "convnext_atto",
    "resnet18",
    "densenet121",
)


def _family(name: str) -> tuple[str, str]:
    from timm.models import _registry

    return _registry._model_to_module.get(name, ""), re.split(r"[_\d]", name)[0]


def parameter_count(name: str) -> int:
    import timm

    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())


def families(names: list[str] | None = None) -> list[str]:
    """The smallest model of each family (a model that cannot even be built counts as large)."""
    import timm

    groups: dict[tuple[str, str], list[str]] = {}
    for name in names or timm.list_models():
        groups.setdefault(_family(name), []).append(name)
    chosen = []
    for members in groups.values():
        sizes = {}
        for name in members:
            try:
                sizes[name] = parameter_count(name)
            except Exception:  # the chain itself will report why it cannot be built
                sizes[name] = float("inf")
        chosen.append(min(members, key=lambda name: (sizes[name], name)))
    return sorted(chosen)
