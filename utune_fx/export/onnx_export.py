"""Export a (tuned) module to ONNX, checked and verified with ONNX Runtime before it is put in place.

    export_onnx(result.module, result.example_inputs, "model.onnx")
        -> model.onnx   inputs x[batch, 3, 224, 224]; outputs output[batch, 1000]; weights inside
        -> ExportResult(exporter='dynamo', opset=18, external_data=False, size_bytes=..., parity=Parity(...))
    export_onnx(tuned_gpt2, (input_ids,), "lm.onnx")
        -> lm.onnx      input_ids[batch, sequence]: token inputs get a dynamic sequence axis too, unless
                        the graph fixed it (ExportResult.sequence_fixed says why)

    export_onnx(..., tuner_names=trainable)       the tuner tensors become graph inputs named like the
                                                  parameters (utune.mha.0.down.weight): one file serves
                                                  every task tuned with the same rules, fed as tensors or
                                                  as an ONNX Runtime adapter (adapters.py)
    export_onnx(..., tuner_defaults=initial)      what those inputs hold when nothing is fed (initializers
                                                  of the same names; default: the module's own values)
    a model over external_data_threshold bytes -> model.onnx + model.onnx.data (all weights, one file)

Steps: eval mode; export (``auto``: the dynamo exporter, then TorchScript if it fails; see exporters.py);
write into a staging folder beside ``path``; onnx.checker (path form, so external data is checked too);
ONNX Runtime against PyTorch at batch 1 and 4, and for token inputs at two lengths (verify.py; the
tuner inputs are fed the module's own values, and run once more unfed: their defaults against the module
with those values); only then os.replace into ``path``. In ``auto`` mode an
export that does not verify also falls back; when every exporter fails with a dynamic sequence axis, the
export is tried again at the example's lengths. A failure of every exporter is one UtuneError naming
the op without a translation when the exporters' errors name one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import fx, nn

from utune_fx.errors import UtuneError, first_line
from utune_fx.export.exporters import (
    EXPORTERS,
    RUN,
    Attempt,
    ExportModule,
    describe_failure,
    dynamic_axes,
    eval_mode,
    input_names_of,
    node_calling,
    output_names_for,
)
from utune_fx.export.feeds import TUNER_INPUTS_KEY
from utune_fx.export.ort_guards import guard_zero_pad_max_pool
from utune_fx.export.verify import EXTRA_TOKENS, ModuleFailure, Parity, verify_onnx
from utune_fx.trace import trace_report
from utune_fx.trace.sequence_axes import SEQUENCE_DIM, longer_by, token_inputs


@dataclass
class ExportResult:
    path: Path
    exporter: str  # 'dynamo' or 'torchscript': the one that produced the file
    opset: int
    input_names: list[str]  # data inputs, then the tuner inputs
    output_names: list[str]
    tuner_inputs: list[str] = field(default_factory=list)
    external_data: bool = False  # weights in data_path next to the model
    size_bytes: int = 0  # model file plus data file
    fallback_reason: str | None = None  # why the preferred exporter was not used
    data_path: Path | None = None
    parity: Parity | None = None  # None when export_onnx(..., verify=False)
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)  # input name -> {axis: name}
    sequence_fixed: str | None = None  # token inputs whose sequence axis stays fixed: why
    defaults_parity: Parity | None = None  # tuner inputs left unfed (their defaults) against PyTorch


def _serialized_size(model: onnx.ModelProto) -> int:
    """Bytes of the model as one file; summed per part, as a whole over 2 GB cannot be serialised."""
    graph = model.graph
    parts = (*graph.initializer, *graph.node, *graph.input, *graph.output, *graph.value_info, *model.functions)
    return sum(part.ByteSize() for part in parts)


def _stage(model: onnx.ModelProto, staging: Path, name: str, threshold: int) -> bool:
    """Write the model into ``staging`` under its final name(s), check it; True when the weights went external."""
    external = _serialized_size(model) > threshold
    # the data file's name is recorded in the model, so it is written under its final name
    onnx.save_model(
        model,
        str(staging / name),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=f"{name}.data",
    )
    onnx.checker.check_model(str(staging / name))  # the path form also reads the external data
    return external


def _put_in_place(staging: Path, path: Path, external: bool) -> Path | None:
    data = path.with_name(f"{path.name}.data")
    if external:  # the data first: the model that names it appears last
        _make_ordinary(staging / data.name)
        os.replace(staging / data.name, data)
    _make_ordinary(staging / path.name)
    os.replace(staging / path.name, path)
    if not external and data.exists():  # a stale data file of an earlier export of this path
        data.unlink()
    return data if external else None


def _make_ordinary(file: Path) -> None:
    """onnx writes the data file private (0600); exports are ordinary files like the rest."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)


@dataclass
class _Job:
    """What every exporter gets, and what follows the export."""

    wrapper: ExportModule
    args: tuple
    input_names: list[str]
    output_names: list[str]
    axes: list[dict[int, str]]  # per data input: {axis: name} of its dynamic axes
    opset: int
    path: Path
    threshold: int
    verify: Callable[[Path], Parity] | None
    defaults: dict[str, torch.Tensor] = field(default_factory=dict)  # tuner input -> its initializer


def _run(exporter: str, job: _Job) -> tuple[bool, Path | None, Parity | None] | Attempt:
    """Export, stage, check, verify and put in place: (external, data path, parity), or why not."""
    staging = Path(tempfile.mkdtemp(prefix=f".{job.path.name}.", dir=job.path.parent))
    try:
        try:
            model = RUN[exporter](job.wrapper, job.args, job.opset, job.input_names, job.output_names, job.axes)
        except Exception as error:  # noqa: BLE001  (the exporters raise anything; each failure is reported)
            return describe_failure(exporter, error)
        guard_zero_pad_max_pool(model)  # ONNX Runtime's PadFusion gets zero padding before MaxPool wrong
        _declare_tuner_inputs(model, job.wrapper.tuner_names, exporter)
        _add_defaults(model, job.defaults)
        staged = staging / job.path.name
        try:
            external = _stage(model, staging, job.path.name, job.threshold)
        except onnx.checker.ValidationError as error:
            return Attempt(exporter, f"onnx.checker rejects the model: {first_line(error)}")
        parity = None
        if job.verify:
            try:
                parity = job.verify(staged)
            except ModuleFailure:
                raise
            except UtuneError as error:  # in auto mode the next exporter gets a go
                return Attempt(exporter, str(error).replace(str(staged), "the export"))
            parity.path = job.path
        return external, _put_in_place(staging, job.path, external), parity
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _failure(attempts: list[Attempt], module: nn.Module, opset: int) -> UtuneError:
    reasons = "; ".join(f"{a.exporter}: {a.reason}" for a in attempts)
    op = next((a.op for a in attempts if a.op), None)
    if op:
        node = node_calling(module, op)
        where = f" (graph node {node})" if node else ""
        naming = [a.exporter for a in attempts if a.op == op]  # another exporter may have failed otherwise
        by = "" if len(naming) == len(attempts) else f" in the {' and '.join(naming)} exporter"
        return UtuneError(
            f"cannot export to ONNX: {op}{where} has no ONNX translation{by} in opset {opset} "
            f"({reasons}); try another opset, fold the tuners first if it belongs to a tuner, or "
            "replace the op"
        )
    return UtuneError(
        f"cannot export to ONNX in opset {opset} ({reasons}); try another exporter or opset, and "
        "keep data-dependent Python control flow out of the model"
    )


def _check_arguments(module: nn.Module, inputs: tuple, exporter: str, tuner_names: Sequence[str]) -> None:
    if exporter not in ("auto", *EXPORTERS):
        raise UtuneError(f"unknown exporter {exporter!r}; use auto, {' or '.join(EXPORTERS)}")
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise UtuneError("export needs example inputs that are all tensors (one per model input)")
    parameters = dict(module.named_parameters())
    unknown = [name for name in tuner_names if name not in parameters]
    if unknown:
        raise UtuneError(
            f"tuner name {unknown[0]} is not a parameter of the model; pass names from "
            "module.named_parameters(), such as the trainable ones"
        )
    if len(set(tuner_names)) != len(tuner_names):
        raise UtuneError("tuner names repeat a name; pass each parameter once")


def export_onnx(
    module: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    opset: int = 18,
    exporter: str = "auto",
    tuner_names: Sequence[str] | None = None,
    tuner_defaults: Mapping[str, torch.Tensor] | None = None,
    external_data_threshold: int = 2**31,
    verify: bool = True,
    batch_sizes: Sequence[int] = (1, 4),
) -> ExportResult:
    """Export ``module`` to ``path`` with a dynamic batch axis (dim 0 of the batched inputs and of every
    output) and a dynamic sequence axis on token inputs where the module allows it; with ``verify`` the
    file is put in place only once ONNX Runtime matches PyTorch at ``batch_sizes`` (and two lengths).
    ``tuner_names``: parameters that become graph inputs (fixed shapes) named as the parameters;
    ``tuner_defaults`` ({name: tensor}, default: the module's values): what each holds when it is not fed,
    so an ONNX Runtime adapter (or no feed at all) can stand in for the feeds; verified unfed too.
    Weights go to ``<path>.data`` when the model would exceed ``external_data_threshold``."""
    path = Path(path)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    tuner_names = list(tuner_names or [])
    _check_arguments(module, inputs, exporter, tuner_names)
    parameters = dict(module.named_parameters())
    tuners = tuple(parameters[name].detach().clone() for name in tuner_names)
    feeds = dict(zip(tuner_names, tuners))  # verified with the module's own tuner values
    defaults = _defaults(feeds, tuner_defaults)
    verified: dict[str, Parity] = {}
    with eval_mode(module):
        with torch.no_grad():
            output_count = len(ExportModule(module, len(inputs))(*inputs))
        fixed_because = _fixed_sequence_reason(module, inputs)

        def check(staged):
            parity = verify_onnx(staged, module, inputs, batch_sizes=batch_sizes, tuner_feeds=feeds)
            if defaults:
                try:
                    verified["defaults"] = verify_onnx(
                        staged, WithTensors(module, defaults), inputs, batch_sizes=batch_sizes
                    )
                except UtuneError as error:
                    raise UtuneError(f"with the tuner inputs unfed (their defaults): {error}") from error
            return parity

        job = _Job(
            ExportModule(module, len(inputs), tuner_names),
            inputs + tuners,
            input_names_of(module, len(inputs)) + tuner_names,
            output_names_for(output_count),
            dynamic_axes(inputs, sequence=fixed_because is None),
            opset,
            path,
            external_data_threshold,
            check if verify else None,
            defaults,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        exporters = EXPORTERS if exporter == "auto" else (exporter,)
        outcome = _first_export(job, exporters)
        if isinstance(outcome, list) and any(token_inputs(inputs)) and fixed_because is None:
            # a graph that takes every length in PyTorch may still not export so: try the example's lengths
            fixed_because = "with a dynamic sequence axis every exporter failed (" + _reasons(outcome) + ")"
            job.axes = dynamic_axes(inputs, sequence=False)
            outcome = _first_export(job, exporters)
        if isinstance(outcome, list):
            raise _failure(outcome, module, opset)
        exporter_name, (external, data, parity), attempts = outcome
        size = path.stat().st_size + (data.stat().st_size if data else 0)
        return ExportResult(
            path,
            exporter_name,
            opset,
            job.input_names,
            job.output_names,
            tuner_names,
            external,
            size,
            _reasons(attempts) or None,
            data,
            parity,
            {name: axis for name, axis in zip(job.input_names, job.axes) if axis},
            fixed_because if any(token_inputs(inputs)) else None,
            verified.get("defaults"),
        )


def _reasons(attempts: list[Attempt]) -> str:
    return "; ".join(f"{a.exporter}: {a.reason}" for a in attempts)


def _first_export(job: _Job, exporters: Sequence[str]):
    """(exporter, its outcome, the attempts that failed before it), or every failed attempt."""
    attempts: list[Attempt] = []
    for exporter_name in exporters:
        outcome = _run(exporter_name, job)
        if not isinstance(outcome, Attempt):
            return exporter_name, outcome, attempts
        attempts.append(outcome)
    return attempts


def _fixed_sequence_reason(module: nn.Module, inputs: tuple) -> str | None:
    """Why the token inputs' sequence axis must stay at the example's lengths, or None when it need
    not (or there are no token inputs): the trace report's reason, or the module failing at more tokens."""
    if not any(token_inputs(inputs)):
        return None
    try:
        traced = trace_report(module).sequence if isinstance(module, fx.GraphModule) else None
    except KeyError:  # a graph utune_fx.trace did not make
        traced = None
    if traced is not None and not traced.dynamic:
        return traced.reason
    longer = longer_by(inputs, EXTRA_TOKENS, torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            module(*longer)
    except Exception as error:  # noqa: BLE001  (whatever the model raises, the axis stays fixed)
        tokens = max(x.shape[SEQUENCE_DIM] for x, t in zip(longer, token_inputs(inputs)) if t)
        return f"the PyTorch module fails at {tokens} tokens ({first_line(error)})"
    return None


def _declare_tuner_inputs(model: onnx.ModelProto, tuner_names: list[str], exporter: str) -> None:
    """Check the tuner tensors really are graph inputs and record them for tuner_feeds."""
    inputs = {i.name for i in model.graph.input}
    initializers = {i.name for i in model.graph.initializer}
    lost = [name for name in tuner_names if name not in inputs or name in initializers]
    if lost:
        raise UtuneError(
            f"the {exporter} exporter did not keep tuner tensor {lost[0]} as a graph input (it does "
            "not reach the outputs, or became a constant); pass only tensors the outputs depend on"
        )
    if tuner_names:
        entry = model.metadata_props.add()
        entry.key, entry.value = TUNER_INPUTS_KEY, json.dumps(tuner_names)


class WithTensors(nn.Module):
    """``module`` with some of its parameters replaced by ``tensors`` (torch.func.functional_call)."""

    def __init__(self, module: nn.Module, tensors: Mapping[str, torch.Tensor]):
        super().__init__()
        self.module, self.tensors = module, dict(tensors)

    def forward(self, *inputs: torch.Tensor) -> Any:
        return torch.func.functional_call(self.module, self.tensors, inputs)


def _defaults(values: dict[str, torch.Tensor], defaults: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Each tuner input's default: ``defaults``'s tensor, checked against the parameter's, or its value."""
    if defaults is None:
        return dict(values)
    unknown = [name for name in defaults if name not in values]
    if unknown:
        raise UtuneError(f"tuner default {unknown[0]} is not one of the tuner names; give defaults for those only")
    chosen = {}
    for name, value in values.items():
        default = defaults.get(name, value)
        if tuple(default.shape) != tuple(value.shape) or default.dtype != value.dtype:
            raise UtuneError(
                f"tuner default {name} is {str(default.dtype).removeprefix('torch.')} {list(default.shape)}, "
                f"the parameter {str(value.dtype).removeprefix('torch.')} {list(value.shape)}; give a tensor like it"
            )
        chosen[name] = default.detach().to(value.device).clone()
    return chosen


def _add_defaults(model: onnx.ModelProto, defaults: dict[str, torch.Tensor]) -> None:
    """An initializer for each tuner input: ONNX Runtime then runs the graph without feeding it (an
    overridable initializer), which its adapters need: it checks the required inputs before it adds
    an active adapter's tensors to the feeds."""
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    for name, tensor in defaults.items():
        tensor = tensor.detach().cpu().contiguous()
        bits = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bfloat16
        initializer = onnx.TensorProto(name=name, data_type=inputs[name], dims=list(tensor.shape))
        initializer.raw_data = bits.numpy().tobytes()
        model.graph.initializer.append(initializer)
