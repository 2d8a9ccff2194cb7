"""Training checkpoints: tuner-only weights, optimizer, schedule, RNG, progress and the run's settings.

    checkpoint/
      tensors.safetensors   trainable parameters ("model.<name>"), optimizer tensors
                            ("optim.<param index>.<key>"), RNG states ("rng.torch", "rng.cuda.<i>", "rng.numpy")
      state.json            format, epoch, step in epoch, optimizer param groups and scalars, schedule,
                            python and numpy RNG state, metrics so far, the settings the run was
                            started with, its data size, the names of the tensors above

Written through ``replace_directory`` (a crash or Ctrl-C mid-write leaves the previous
checkpoint whole) and read with safetensors and json only: nothing is unpickled.
state.json is checked against utune_fx/schemas/checkpoint.schema.json and the tensors
against the names, shapes and kinds the model and state.json imply before anything is
restored, so a damaged or hand-edited checkpoint is one line naming the field or tensor.
"""

from __future__ import annotations

import json
import random
import stat
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

from utune_fx.atomic import recover_directory, replace_directory
from utune_fx.errors import UtuneError, first_line
from utune_fx.schemas import read_json

TENSORS, STATE = "tensors.safetensors", "state.json"
FORMAT = "utune_fx.checkpoint/1"
_FIX = "remove the checkpoint folder and train without --resume (or into another -o)"


def save_checkpoint(
    directory: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule,
    progress: dict,
    settings: dict,
    data: dict,
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
        "format": FORMAT,
        "progress": progress,
        "optimizer": {"param_groups": optim_state["param_groups"], "scalars": scalars},
        "schedule": schedule.state_dict(),  # LambdaLR stores None for plain functions
        "rng": {
            "python": [python_state[0], list(python_state[1]), python_state[2]],
            "numpy": [numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        },
        "settings": settings,
        "data": data,
        "tensors": sorted(tensors),
    }
    with replace_directory(directory) as staging:
        safetensors.torch.save_file(tensors, str(staging / TENSORS))
        (staging / STATE).write_text(json.dumps(state))


def read_state(directory: Path) -> dict:
    """state.json, checked against its schema (one line naming the field otherwise); no tensors read."""
    recover_directory(directory)  # a swap killed between its renames: the previous checkpoint comes back
    _require_regular_file(directory / STATE)
    return read_json(directory / STATE, "checkpoint", fix=_FIX)


def _require_regular_file(path: Path) -> None:
    """Before opening: a FIFO would wait for a writer forever, a link to /dev/zero never ends."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UtuneError(f"{path} is missing; {_FIX}") from None
    except OSError as error:
        raise UtuneError(f"{path}: cannot read ({first_line(error)}); {_FIX}") from error
    if not stat.S_ISREG(mode):
        raise UtuneError(f"{path} is not a regular file (a pipe, device or folder); {_FIX}")


def load_checkpoint(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer, schedule) -> dict:
    """Restore everything ``save_checkpoint`` wrote; returns the whole (checked) state record."""
    state = read_state(directory)
    _require_regular_file(directory / TENSORS)
    try:
        tensors = safetensors.torch.load_file(str(directory / TENSORS))
    except Exception as error:  # safetensors reports damage as several exception kinds
        raise UtuneError(
            f"{directory / TENSORS}: not a readable safetensors file ({first_line(error)}); {_FIX}"
        ) from error
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    _check_tensors(directory, state, tensors, trainable, optimizer)
    try:
        _restore(state, tensors, trainable, optimizer, schedule)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, OverflowError) as error:
        raise UtuneError(f"{directory}: the checkpoint cannot be restored ({first_line(error)}); {_FIX}") from error
    return state


def _check_tensors(directory: Path, state: dict, tensors: dict, trainable: dict, optimizer) -> None:
    """Every tensor state.json lists is there, with the name, shape and dtype the model implies."""
    where = directory / TENSORS

    def refuse(problem: str) -> None:
        raise UtuneError(f"{where}: {problem}; {_FIX}")

    missing = sorted(set(state["tensors"]) - set(tensors))
    if missing:
        refuse(f"{missing[0]} is missing ({len(missing)} of the {len(state['tensors'])} tensors state.json lists)")
    for required in ("rng.torch", "rng.numpy"):
        if required not in tensors:
            refuse(f"{required} is missing (the random state a resumed run continues from)")
    saved = {k[len("model.") :] for k in tensors if k.startswith("model.")}
    if saved != set(trainable):
        raise UtuneError(
            f"{directory}: the checkpoint holds other trainable tensors than this model "
            f"(e.g. {sorted(saved ^ set(trainable))[:2]}); was it written for other rules?"
        )
    for name, parameter in trainable.items():
        if tensors[f"model.{name}"].shape != parameter.shape:
            refuse(
                f"model.{name} has shape {list(tensors[f'model.{name}'].shape)}, the model's is {list(parameter.shape)}"
            )
    if tensors["rng.torch"].shape != torch.get_rng_state().shape or tensors["rng.torch"].dtype != torch.uint8:
        refuse("rng.torch is not a torch random state")
    if tensors["rng.numpy"].shape != (624,) or tensors["rng.numpy"].dtype != torch.int64:
        refuse("rng.numpy is not a numpy random state (624 int64 values)")
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    groups = state["optimizer"]["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        refuse("optimizer.param_groups in state.json do not fit this model's trainable parameters")
    if [i for g in groups for i in g["params"]] != list(range(len(parameters))):
        refuse("optimizer.param_groups[].params must number the parameters 0, 1, 2, ... in order")
    for index, (saved, fresh) in enumerate(zip(groups, optimizer.param_groups)):
        for key, value in fresh.items():  # the settings (compared already) make these; the file must agree
            if key not in ("params", "lr") and key in saved and saved[key] != _as_json(value):
                raise UtuneError(
                    f"{directory / STATE}: optimizer.param_groups[{index}].{key} is {saved[key]!r}, the run's "
                    f"settings give {_as_json(value)!r}; {_FIX}"
                )
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        _, index, name = (key.split(".", 2) + ["", ""])[:3]
        if not index.isdigit() or int(index) >= len(parameters) or not name:
            refuse(f"{key} names no parameter of the optimizer (it has {len(parameters)})")
        if name != "step" and value.shape != parameters[int(index)].shape:
            refuse(f"{key} has shape {list(value.shape)}, its parameter's is {list(parameters[int(index)].shape)}")
        if not value.is_floating_point():
            refuse(f"{key} is not a floating-point tensor")


def _as_json(value):
    """A value as it reads back from state.json (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


def _restore(state: dict, tensors: dict, trainable: dict, optimizer, schedule) -> None:
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(tensors[f"model.{name}"])
    optim_state: dict = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
    device = next(iter(trainable.values()), torch.empty(0)).device
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optim_state["state"].setdefault(int(index), {})[name] = value if name == "step" else value.to(device)
    for index, scalars in state["optimizer"]["scalars"].items():
        optim_state["state"].setdefault(int(index), {}).update(scalars)
    optimizer.load_state_dict(optim_state)
    # the schedule's position is all it takes from the file (checked against progress); its learning
    # rates are recomputed, which gives the stored ones bit for bit and stretches the decay when --epochs grew
    position = state["schedule"]["last_epoch"]
    rates = [base * factor(position) for base, factor in zip(schedule.base_lrs, schedule.lr_lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    schedule.load_state_dict(
        schedule.state_dict() | {"last_epoch": position, "_step_count": position + 1, "_last_lr": rates}
    )
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = state["rng"]["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))


def check_progress(directory: Path, state: dict, train_images: int, steps_per_epoch: int) -> None:
    """The checkpoint's position fits the data and schedule it is resumed with (a hand-edited epoch or step,
    or other data behind the same spec, is one line)."""
    progress, where = state["progress"], directory / STATE

    def refuse(problem: str) -> None:
        raise UtuneError(f"{where}: {problem}; {_FIX}")

    if state["data"]["train_images"] != train_images:
        raise UtuneError(
            f"{directory}: the run trained on {state['data']['train_images']} images per epoch, the data now gives "
            f"{train_images}; resume with the same --data and selection, or start a new run in another -o"
        )
    if state["data"]["steps_per_epoch"] != steps_per_epoch:
        refuse(f"data.steps_per_epoch is {state['data']['steps_per_epoch']}, these settings make {steps_per_epoch}")
    if progress["step"] >= steps_per_epoch:
        refuse(f"progress.step {progress['step']} is beyond the {steps_per_epoch} optimizer steps of an epoch")
    if len(progress["history"]) != progress["epoch"]:
        refuse(f"progress.history holds {len(progress['history'])} epochs, progress.epoch says {progress['epoch']}")
    if progress["step"] and "running" not in progress:
        refuse("progress.running is missing (the metrics of the epoch the checkpoint stopped in)")
    expected = progress["epoch"] * steps_per_epoch + progress["step"]
    if state["schedule"]["last_epoch"] != expected:
        refuse(f"schedule.last_epoch is {state['schedule']['last_epoch']}, progress (epoch, step) implies {expected}")
    if len({"val_accuracy" in row for row in progress["history"]}) > 1:
        refuse("progress.history has val_accuracy in some epochs only")
