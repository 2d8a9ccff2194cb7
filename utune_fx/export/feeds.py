"""Tuner tensors as ONNX Runtime feeds: one exported graph, many tuned tasks.

    export_onnx(..., tuner_names=[...])  -> model.onnx whose inputs are  x, utune.mha.0.down.weight, ...
    tuner_feeds("runs/task_a", "model.onnx")  -> {"utune.mha.0.down.weight": ndarray[8, 192], ...}
    session.run(None, {"x": images, **feeds})  # task A; feeds from runs/task_b give task B

The tensors come from a tuned artifact directory (its tuners.safetensors) or any .safetensors file,
read with safetensors (never pickle). ``names`` says what is expected: a list of names, a
{name: shape} mapping, or the exported .onnx file, whose tuner inputs (names, shapes, dtypes) are
recorded in its metadata (read through utune_fx/schemas, tuner_inputs.schema.json; each name must be a
graph input). A damaged .onnx file, damaged metadata, missing, unexpected and mis-shaped tensors are
one-line errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx.helper import tensor_dtype_to_np_dtype
from safetensors import safe_open

from utune_fx.errors import UtuneError, first_line
from utune_fx.rewrite.artifact import TENSORS
from utune_fx.schemas import parse_json

TUNER_INPUTS_KEY = "utune_fx.tuner_inputs"  # ONNX metadata: JSON list of the tuner input names

Expected = dict[str, tuple[tuple[int, ...] | None, np.dtype | None]]  # name -> (shape, dtype), None: any


def onnx_tuner_inputs(path: str | Path) -> Expected:
    """The tuner inputs an exported model declares, with their shapes and dtypes."""
    if not Path(path).is_file():
        raise UtuneError(f"{path}: no such ONNX file; pass the file cli.py export wrote")
    try:
        model = onnx.load(str(path), load_external_data=False)  # the graph only, not the weights
    except Exception as error:  # protobuf's DecodeError and friends
        raise UtuneError(f"{path}: not a readable ONNX file ({first_line(error)}); export it again") from error
    recorded = {prop.key: prop.value for prop in model.metadata_props}.get(TUNER_INPUTS_KEY)
    if recorded is None:
        raise UtuneError(
            f"{path} was exported without tuner inputs; export it with tuner_names "
            "(the trainable parameter names) to feed tuners at run time"
        )
    where, fix = f"{path}: metadata {TUNER_INPUTS_KEY}", "export the model again"
    names = parse_json(recorded, "tuner_inputs", where, fix)
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    for name in names:
        if name not in inputs:
            raise UtuneError(f"{where}: {name!r} is not an input of the graph; {fix}")
    try:
        return {
            name: (
                tuple(d.dim_value for d in inputs[name].shape.dim),
                np.dtype(tensor_dtype_to_np_dtype(inputs[name].elem_type)),
            )
            for name in names
        }
    except (KeyError, TypeError, ValueError) as error:  # an element type numpy has no dtype for
        raise UtuneError(f"{path}: a tuner input has no numpy type ({first_line(error)}); {fix}") from error


def _expected(names: Sequence[str] | Mapping[str, Sequence[int]] | str | Path) -> Expected:
    if isinstance(names, (str, Path)):
        return onnx_tuner_inputs(names)
    if isinstance(names, Mapping):
        return {name: (tuple(shape), None) for name, shape in names.items()}
    return {name: (None, None) for name in names}


def _tensor_file(source: str | Path) -> Path:
    source = Path(source)
    if source.is_dir():
        path = source / TENSORS
        if not path.is_file():
            raise UtuneError(f"{source}: no {TENSORS} here; pass a tuned artifact directory or a .safetensors file")
        return path
    if source.suffix != ".safetensors" or not source.is_file():
        raise UtuneError(
            f"{source}: not a tuned artifact directory or a .safetensors file; tuner tensors are "
            "read from safetensors only"
        )
    return source


def tuner_feeds(
    source: str | Path, names: Sequence[str] | Mapping[str, Sequence[int]] | str | Path
) -> dict[str, np.ndarray]:
    """Read the tuner tensors ``names`` expects from ``source`` as ONNX Runtime feeds (in ``names`` order)."""
    path = _tensor_file(source)
    expected = _expected(names)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            check_names(path, set(handle.keys()), expected, "export with the same tuner names as the artifact")
            tensors = {name: handle.get_tensor(name) for name in expected}
    except UtuneError:
        raise
    except Exception as error:  # safetensors raises its own types for damaged headers and bfloat16 in numpy
        raise UtuneError(
            f"{path}: cannot read the tuner tensors ({first_line(error)}); write float32 tensors with safetensors"
        ) from error
    check_shapes(path, {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}, expected)
    return tensors


def check_names(where: str | Path, found: set[str], expected: Mapping, fix: str) -> None:
    """One line naming the first tensor ``expected`` lacks in ``found``, or the first it does not expect."""
    missing, unexpected = [n for n in expected if n not in found], sorted(found - set(expected))
    if missing:
        raise UtuneError(
            f"{where}: tuner tensor {missing[0]} is missing ({len(missing)} of {len(expected)} "
            f"missing); was it written for other rules or another model?"
        )
    if unexpected:
        raise UtuneError(
            f"{where}: tensor {unexpected[0]} is not a tuner input of the model ({len(unexpected)} unexpected); {fix}"
        )


def check_shapes(where: str | Path, found: Mapping[str, tuple[tuple[int, ...], np.dtype]], expected: Expected) -> None:
    """One line naming the first tensor whose shape or dtype is not the one ``expected`` declares."""
    for name, (shape, dtype) in expected.items():
        got_shape, got_dtype = found[name]
        if shape is not None and tuple(got_shape) != shape:
            raise UtuneError(
                f"{where}: tuner tensor {name} has shape {list(got_shape)}, the model expects "
                f"{list(shape)}; was it trained with other tuner settings?"
            )
        if dtype is not None and got_dtype != dtype:
            raise UtuneError(
                f"{where}: tuner tensor {name} is {got_dtype}, the model expects {dtype}; "
                "export and train in the same dtype"
            )
