"""The torchvision catalogue: every classification model ``torchvision.models.list_models`` names,
built with ``weights=None`` at a small input size, with the attention and FFN counts its
constructor's arguments give.

    tv_models()             -> ["alexnet", "convnext_base", ..., "wide_resnet50_2"]   (80 in 0.28)
    tv_build("vit_b_16")    -> (VisionTransformer(image_size=32), (2, 3, 32, 32))
    expected_counts("swin_t") -> {"self_attention": 12, "cross_attention": 0, "ffn": 12}

Input size: 64 x 64 (every CNN's adaptive pooling takes it), 80 for Inception v3 (its stem needs 75),
the ViTs at twice their patch size (``image_size=32`` for vit_b_16: 4 patches), MaxViT at its fixed 224
(its window and grid partitions of 7 need it).

Counts: torchvision has no config; the transformer builders fix their depths (``num_layers`` of the
ViTs, ``depths`` of Swin, ``block_layers`` of MaxViT, each MaxViT layer one window and one grid
attention), copied here from torchvision/models/*.py. Each of those blocks pairs its attention with
one MLP; a classifier has no cross-attention; the CNNs have neither.
"""

from __future__ import annotations

import torch

import utune_fx  # noqa: F401  (before torchvision)

# attentions per model, from the builders' arguments (torchvision 0.28)
ATTENTIONS = {
    "vit_b_16": 12,
    "vit_b_32": 12,
    "vit_l_16": 24,
    "vit_l_32": 24,
    "vit_h_14": 32,
    "swin_t": sum((2, 2, 6, 2)),
    "swin_s": sum((2, 2, 18, 2)),
    "swin_b": sum((2, 2, 18, 2)),
    "swin_v2_t": sum((2, 2, 6, 2)),
    "swin_v2_s": sum((2, 2, 18, 2)),
    "swin_v2_b": sum((2, 2, 18, 2)),
    "maxvit_t": 2 * sum((2, 2, 5, 2)),
}
SIZE, SIZES = 64, {"inception_v3": 80, "maxvit_t": 224}
# CI: CNNs of every kind and the transformers' smallest, all small at 64 x 64
CI_SAMPLE = (
    "resnet18",
    "mobilenet_v3_small",
    "mnasnet0_5",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "regnet_x_400mf",
    "efficientnet_b0",
    "googlenet",
    "swin_t",
    "vit_b_32",
)


def tv_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def tv_options(name: str) -> dict:
    """Builder arguments: the ViTs' image size (two patches a side; vit_b_16 -> 32)."""
    return {"image_size": 2 * int(name.rsplit("_", 1)[1])} if name.startswith("vit_") else {}


def input_size(name: str) -> tuple[int, int, int, int]:
    size = tv_options(name).get("image_size", SIZES.get(name, SIZE))
    return (2, 3, size, size)


def tv_build(name: str, device: str = "cpu") -> torch.nn.Module:
    """The model, random weights, in eval mode, on ``device`` (RegNet's builder computes its widths with
    tensors, which the meta device cannot read back: it is built on the CPU and moved)."""
    import torchvision

    try:
        with torch.device(device):
            model = torchvision.models.get_model(name, weights=None, **tv_options(name))
    except NotImplementedError:
        if device != "meta":
            raise
        model = torchvision.models.get_model(name, weights=None, **tv_options(name)).to("meta")
    return model.eval()


def expected_counts(name: str) -> dict[str, int]:
    attentions = ATTENTIONS.get(name, 0)
    return {"self_attention": attentions, "cross_attention": 0, "ffn": attentions}
