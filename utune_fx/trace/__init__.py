"""Tracing front end: any nn.Module -> annotated torch.fx GraphModule.

    gm = trace(model, example_inputs)          # fx, leaf fallback, torch.export
    node_info(node).op_kind / .scope / .shape  # every node annotated
    trace_report(gm)                           # front end, opaque modules, time

Front ends: ``fx`` (torch.fx symbolic tracing, see :mod:`.fx_frontend`) and
``export`` (torch.export, see :mod:`.export_frontend`). ``auto`` tries fx; it
turns to torch.export when fx cannot trace the model's own forward, or when
fx's graph leaves something opaque that torch.export can see inside: a
submodule fx failed to trace, or a node that hides an attention
(nn.MultiheadAttention, a wrapped function computing attention; see
:mod:`.hidden_attention`). An op using a submodule's weights takes that
submodule's scope (:mod:`.weight_scopes`).
The traced graph computes exactly what the model computes for the example
inputs; branches on ``self.training`` are taken as in eval mode.
Shapes and dtypes are propagated on the meta device, without computing anything
(:mod:`.shape_propagation`), so a model built on the meta device traces too;
``TraceReport.shapes_by`` says whether a fallback (fake tensors, a real forward) was needed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn

from utune_fx.errors import UtuneError, first_line
from utune_fx.trace.annotate import SHAPES_KEY, NodeInfo, annotate, node_info, set_training
from utune_fx.trace.export_frontend import SEQUENCE_KEY, ExportFailure, export_trace, kv_cache_off
from utune_fx.trace.fx_frontend import FxTraceFailure, OpaqueModule, fx_trace
from utune_fx.trace.opkinds import OP_KINDS
from utune_fx.trace.sequence_axes import SequenceAxis
from utune_fx.trace.weight_scopes import scope_ops_by_weight_owner

__all__ = ["NodeInfo", "OP_KINDS", "OpaqueModule", "SequenceAxis", "TraceReport", "node_info", "trace", "trace_report"]

Frontend = Literal["auto", "fx", "export"]
_REPORT_KEY = "utune_trace"


@dataclass
class TraceReport:
    frontend: str  # the front end that produced the graph: 'fx' or 'export'
    seconds: float  # tracing and annotation, wall time
    input_shapes: list[tuple[int, ...]]
    opaque: list[OpaqueModule] = field(default_factory=list)
    shape_decisions: list[str] = field(default_factory=list)  # shape branches fixed to the inputs
    fx_failure: str | None = None  # why fx was not used, when export was
    settings: list[str] = field(default_factory=list)  # model settings changed while tracing (use_cache)
    sequence: SequenceAxis | None = None  # export front end, token inputs: dynamic sequence axis, or why fixed
    shapes_by: str = "meta"  # how annotation got shapes: 'meta' (nothing computed), 'fake' or 'forward'
    shapes_fallback: str | None = None  # why the meta (and fake) propagation failed, when it did


def trace_report(gm: fx.GraphModule) -> TraceReport:
    return gm.meta[_REPORT_KEY]


def _as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else ()


def _on_model_device(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """A model built on the meta device reads its example inputs there too (a CPU tensor of token
    ids cannot index a meta embedding); any other model's inputs are left as they are."""
    tensors = [*model.parameters(), *model.buffers()]
    if not tensors or any(t.device.type != "meta" for t in tensors):
        return inputs
    return tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)


def check_inputs(model: nn.Module, inputs: Sequence[Any], name: str) -> None:
    """Raise a user error if the model itself rejects the example inputs."""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as error:
        shapes = ", ".join("x".join(map(str, _shape_of(x))) or type(x).__name__ for x in inputs)
        raise UtuneError(
            f"{name} rejects example input(s) of shape {shapes} ({first_line(error)}); "
            "pass --input-shape with a shape the model accepts"
        ) from error


def trace(
    model: nn.Module, example_inputs: Any, *, frontend: Frontend = "auto", name: str | None = None
) -> fx.GraphModule:
    """Trace ``model`` on ``example_inputs`` (a tensor or a tuple) and annotate it."""
    if frontend not in ("auto", "fx", "export"):
        raise UtuneError(f"unknown front end {frontend!r}; use auto, fx or export")
    name = name or type(model).__name__
    inputs = _on_model_device(model, _as_inputs(example_inputs))
    started = time.perf_counter()
    was_training = model.training
    model.eval()  # branches on self.training are taken as at inference
    try:
        with kv_cache_off(model) as settings:
            gm, fx_result, fx_failure = _trace_with(model, inputs, frontend, name)
    finally:
        model.train(was_training)
    scope_ops_by_weight_owner(gm)
    try:
        annotate(gm, inputs)
    except Exception as error:
        check_inputs(model, inputs, name)
        raise UtuneError(
            f"{name}: the traced graph does not run on the example inputs ({first_line(error)}); try --frontend export"
        ) from error
    set_training(gm, was_training)
    model.train(was_training)  # the graph shares the model's leaf modules
    shapes_by, shapes_fallback = gm.meta.pop(SHAPES_KEY)
    report = TraceReport(
        frontend="fx" if fx_result is not None else "export",
        seconds=time.perf_counter() - started,
        input_shapes=[_shape_of(x) for x in inputs],
        opaque=fx_result.opaque if fx_result else [],
        shape_decisions=list(dict.fromkeys(fx_result.shape_decisions)) if fx_result else [],
        fx_failure=fx_failure,
        settings=settings,
        sequence=gm.meta.pop(SEQUENCE_KEY, None),
        shapes_by=shapes_by,
        shapes_fallback=shapes_fallback,
    )
    gm.meta[_REPORT_KEY] = report
    return gm


def _trace_with(model: nn.Module, inputs: tuple[Any, ...], frontend: Frontend, name: str):
    """(graph, fx result or None, why fx was not used). In auto mode torch.export
    also gets a go when fx left modules opaque or hid attention in one node: it may see inside them."""
    fx_result, fx_failure = None, None
    if frontend in ("auto", "fx"):
        try:
            fx_result = fx_trace(model, inputs)
        except TypeError as error:  # forward() needs inputs that were not given
            raise UtuneError(f"{name}: {error}; pass one --input-shape per input") from error
        except FxTraceFailure as error:
            fx_failure = str(error)
            if frontend == "fx":
                raise UtuneError(
                    f"{name} cannot be traced by torch.fx ({fx_failure}); try --frontend export"
                ) from error
        if fx_result is not None and (frontend == "fx" or not fx_result.opaque):
            return fx_result.gm, fx_result, None
    try:
        gm = export_trace(model, inputs)
    except ExportFailure as error:
        if fx_result is not None:  # keep fx's graph, opaque modules and all
            return fx_result.gm, fx_result, None
        check_inputs(model, inputs, name)
        why = f"torch.fx: {fx_failure}; torch.export: {error}" if fx_failure else str(error)
        fix = error.fix or "make the failing code traceable or wrap it in a submodule so it can become a leaf"
        raise UtuneError(f"{name} cannot be traced ({why}); {fix}") from error
    if fx_result is not None:
        first = fx_result.opaque[0]
        fx_failure = f"{len(fx_result.opaque)} module(s) opaque to torch.fx, first {first.path}: {first.reason}"
    return gm, None, fx_failure
