"""Training checkpoints: tuner-only weights, optimizer, schedule, RNG and progress.

    checkpoint/
      tensors.safetensors   trainable parameters ("model.<name>"), optimizer tensors
                            ("optim.<param index>.<key>"), RNG states ("rng.torch", "rng.cuda.<i>", "rng.numpy")
      state.json            epoch, step in epoch, optimizer param groups and scalars, schedule,
                            python RNG state, metrics so far

Written through ``replace_directory`` (a crash or Ctrl-C mid-write leaves the previous
checkpoint whole) and read with safetensors and json only: nothing is unpickled.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

from utune_fx.atomic import replace_directory
from utune_fx.errors import UtuneError, first_line

TENSORS, STATE = "tensors.safetensors", "state.json"


def save_checkpoint(
    directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer, schedule, progress: dict
) -> None:
    tensors = {f"model.{n}": p.detach().contiguous().cpu() for n, p in module.named_parameters() if p.requires_grad}
    optim_state = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for index, entry in optim_state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    numpy_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(numpy_state[1].astype(np.int64))
    python_state = random.getstate()
    state = {
        "progress": progress,
        "optimizer": {"param_groups": optim_state["param_groups"], "scalars": scalars},
        "schedule": schedule.state_dict(),  # LambdaLR stores None for plain functions
        "rng": {
            "python": [python_state[0], list(python_state[1]), python_state[2]],
            "numpy": [numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        },
    }
    with replace_directory(directory) as staging:
        safetensors.torch.save_file(tensors, str(staging / TENSORS))
        (staging / STATE).write_text(json.dumps(state))


def load_checkpoint(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer, schedule) -> dict:
    """Restore everything ``save_checkpoint`` wrote; returns the progress record."""
    try:
        tensors = safetensors.torch.load_file(str(directory / TENSORS))
        state = json.loads((directory / STATE).read_text())
    except FileNotFoundError as error:
        raise UtuneError(f"{directory}: no checkpoint to resume ({first_line(error)}); run without --resume") from error
    except Exception as error:
        raise UtuneError(
            f"{directory}: the checkpoint is damaged ({first_line(error)}); remove it and run without --resume"
        ) from error
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    saved = {k[len("model.") :] for k in tensors if k.startswith("model.")}
    if saved != set(trainable):
        raise UtuneError(
            f"{directory}: the checkpoint holds other trainable tensors than this model "
            f"(e.g. {sorted(saved ^ set(trainable))[:2]}); was it written for other rules?"
        )
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(tensors[f"model.{name}"])
    optim_state: dict = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
    device = next(iter(trainable.values())).device
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optim_state["state"].setdefault(int(index), {})[name] = value if name == "step" else value.to(device)
    for index, scalars in state["optimizer"]["scalars"].items():
        optim_state["state"].setdefault(int(index), {}).update(scalars)
    optimizer.load_state_dict(optim_state)
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    kind, pos, has_gauss, cached = state["rng"]["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    return state["progress"]
