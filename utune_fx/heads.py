"""How a fresh classifier starts: the one initialisation for every head utune_fx creates or re-sizes.

    head rule with num_classes          nn.Linear(in, classes)          -> start_fresh_head
    timm:NAME?num_classes=10&weights=.. classifier not in the weights   -> start_fresh_head
    timm:NAME?num_classes=10&pretrained=true (timm drops the classifier) -> start_fresh_head

Weights zero, bias zero: every class starts at the same logit, the loss at ln(classes), and the
first steps learn the classes instead of unlearning a random start. Model libraries initialise
classifiers for training from scratch; timm's EfficientNet and MobileNet draw them from
U(+-1/sqrt(classes)) (+-0.32 for 10 classes), which a short transfer run cannot wash out:
on CIFAR-10 with EfficientNet-Lite0 the head alone reached 41.3% from that start and 55.7% from zero
(closed-form logistic regression: 56.6%; benchmarks/head_init.py, docs/train.md: the table, and why
zero rather than a small normal, which ties).
A classifier loaded with trained weights is never touched.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def start_fresh_head(layer: nn.Module) -> nn.Module:
    """Zero the weight and bias of a new classifier (nn.Linear, or a 1x1 conv classifier)."""
    for name in ("weight", "bias"):
        tensor = getattr(layer, name, None)
        if isinstance(tensor, torch.Tensor):
            tensor.zero_()
    return layer
