"""Tuners as ONNX Runtime adapters: one exported graph, one small ``.onnx_adapter`` file per task.

    export_onnx(module, inputs, "shared.onnx", tuner_names=names, tuner_defaults=initial)
        -> shared.onnx: the tuner tensors are graph inputs whose defaults (initializers) are ``initial``
    export_adapter(module, inputs, "shared.onnx_adapter", "shared.onnx")
        -> the module's tuner tensors in onnxruntime's AdapterFormat, put in place once ONNX Runtime,
           running shared.onnx with it active and no tuner feeds, matches the module in PyTorch
    options = ort.RunOptions(); options.add_active_adapter(load_adapter("task_b.onnx_adapter", "shared.onnx"))
    session.run(None, {"x": images}, options)      # task B; without the adapter: the defaults

What ONNX Runtime 1.31 does with adapters, and so what the graph needs: an active adapter's tensors are
added to the feeds by name after the session has checked that every required input is fed, so the tuner
inputs must have initializers of the same names (overridable initializers) or a run with only the data
fed fails ("Required inputs ... are missing"). An adapter tensor wins over a feed of the same name; a
name that is no input of the graph, or another shape or dtype, fails the run. AdapterFormat records an
adapter and a model version, which ONNX Runtime does not check; we write 1 for both and check names,
shapes and dtypes against the model's recorded tuner inputs instead (load_adapter, export_adapter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx.helper import tensor_dtype_to_np_dtype
from torch import nn

from utune_fx.atomic import replace_file
from utune_fx.errors import UtuneError, first_line
from utune_fx.export.feeds import check_names, check_shapes, onnx_tuner_inputs
from utune_fx.export.verify import Parity, ort_value, verify_onnx

ADAPTER_SUFFIX = ".onnx_adapter"
VERSION = 1  # AdapterFormat's adapter and model versions: ONNX Runtime records them, checks neither


@dataclass
class AdapterResult:
    path: Path
    model: Path  # the ONNX file it is for
    tensors: int
    size_bytes: int
    parity: Parity | None  # ONNX Runtime with the adapter active vs PyTorch; None with verify=False


def adapter_path_for(model: str | Path) -> Path:
    """``shared.onnx`` -> ``shared.onnx_adapter``: where export writes the exported task's adapter."""
    model = Path(model)
    return model.with_name(model.stem + ADAPTER_SUFFIX)


def _signature(values: dict[str, ort.OrtValue]) -> dict[str, tuple[tuple[int, ...], Any]]:
    try:
        return {
            name: (tuple(v.shape()), np.dtype(tensor_dtype_to_np_dtype(v.element_type()))) for name, v in values.items()
        }
    except (KeyError, TypeError, ValueError) as error:  # an element type numpy has no dtype for
        raise UtuneError(f"a tuner tensor has no numpy type ({first_line(error)}); use float32") from error


def load_adapter(path: str | Path, model: str | Path | None = None) -> ort.LoraAdapter:
    """The adapter at ``path`` for ``RunOptions.add_active_adapter``, after checking that its tensors are
    the tuner inputs ``model`` (an ONNX file exported with tuner inputs) declares: names, shapes, dtypes.
    A missing or damaged file, or an adapter of another model, is a one-line UtuneError."""
    path = Path(path)
    if not path.is_file():
        raise UtuneError(f"{path}: no such adapter file; write one with cli.py export --tuners-as-inputs")
    try:
        values = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as error:  # ONNX Runtime raises RuntimeError with a C++ source location
        raise UtuneError(
            f"{path}: not an ONNX Runtime adapter file ({first_line(error).rsplit(') ', 1)[-1]}); "
            "write it again with cli.py export --tuners-as-inputs"
        ) from error
    if model is not None:
        expected = onnx_tuner_inputs(model)
        fix = f"write the adapter for {model} (cli.py export DIR --adapter-for {model})"
        check_names(f"{path} (an adapter for {model})", set(values), expected, fix)
        check_shapes(f"{path} (an adapter for {model})", _signature(values), expected)
    adapter = ort.LoraAdapter()
    try:
        adapter.Load(str(path))
    except Exception as error:
        raise UtuneError(f"{path}: ONNX Runtime cannot load the adapter ({first_line(error)})") from error
    return adapter


def export_adapter(
    module: nn.Module,
    example_inputs: Any,
    path: str | Path,
    model: str | Path,
    *,
    tuner_names: Sequence[str] | None = None,
    verify: bool = True,
    batch_sizes: Sequence[int] = (1, 4),
) -> AdapterResult:
    """Write ``module``'s tuner tensors as an ONNX Runtime adapter for ``model`` (exported with tuner
    inputs from the same base model and rules) at ``path``. ``tuner_names`` (default: the model's tuner
    inputs) must be exactly the model's tuner inputs, each a parameter of ``module`` of the shape and
    dtype the model declares. Written under a temporary name beside ``path``; with ``verify`` renamed
    into place only once ONNX Runtime, running ``model`` with only the data fed and the adapter active,
    matches ``module`` in PyTorch at ``batch_sizes`` (verify_onnx's tolerances)."""
    path, model = Path(path), Path(model)
    if path.suffix != ADAPTER_SUFFIX:
        raise UtuneError(f"{path}: an adapter file's name ends in {ADAPTER_SUFFIX}; name it so")
    if path.resolve() == model.resolve():
        raise UtuneError(f"{path} is the model itself; write the adapter beside it, e.g. {adapter_path_for(model)}")
    expected = onnx_tuner_inputs(model)
    names = list(expected) if tuner_names is None else list(tuner_names)
    fix = f"{model} was exported from other rules or another base model; export the model from this artifact"
    check_names(f"{model}: its tuner inputs and the tuner names", set(names), expected, fix)
    parameters = dict(module.named_parameters())
    check_names(f"the module's parameters, for {model}", set(parameters) & set(expected), expected, fix)
    values = {name: ort_value(parameters[name].detach()) for name in names}
    check_shapes(f"the module's tensors for {model}", _signature(values), expected)
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(VERSION)
    adapter.set_model_version(VERSION)
    adapter.set_parameters(values)
    with replace_file(path) as temporary:
        try:
            adapter.export_adapter(str(temporary.resolve()))
        except Exception as error:
            raise UtuneError(f"{path}: ONNX Runtime cannot write the adapter ({first_line(error)})") from error
        parity = None
        if verify:
            try:
                parity = verify_onnx(model, module, example_inputs, batch_sizes=batch_sizes, adapter=temporary)
            except UtuneError as error:
                message = str(error).replace(str(temporary), str(path))
                if "differs from PyTorch" in message:  # verify_onnx's advice is about exporters
                    message = f"{message.rsplit('; ', 1)[0]}; was {model} exported from the same base model?"
                raise UtuneError(f"{path}: with the adapter active, {message}") from error
            parity.path = path
        size = temporary.stat().st_size
    return AdapterResult(path, model, len(values), size, parity)
