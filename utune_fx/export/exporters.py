"""The two ways torch turns a module into ONNX, behind one calling convention.

    ExportModule(module, inputs=1, tuner_names=[w1, w2])
        forward(x, w1, w2) == module(x) with parameters w1, w2 replaced   (torch.func.functional_call)
        returns a flat tuple of the output tensors (dicts, dataclasses and nesting flattened)

    export_dynamo(...)       torch.export + onnxscript (torch.onnx.export(dynamo=True)); axes as torch.export.Dim
    export_torchscript(...)  the TorchScript tracer (torch.onnx.export(dynamo=False)); the same axes as dynamic_axes
        -> onnx.ModelProto, weights in memory; onnx_export.py decides where they are written

    dynamic_axes(inputs, sequence=True) -> [{0: 'batch', 1: 'sequence'}, ...]    one dict per input

    describe_failure(exporter, error) -> Attempt(reason in one line, the op without a translation if it names one)

What we found on the graphs our rewriter produces (torch 2.13, onnxscript 0.7, opset 18; ViT with
dual_utuner / prefix / lora / vpt_deep / vpt_shallow, Swin with the same, ResNet and ConvNeXt with lora /
utuner_block): both exporters export every one, and ONNX Runtime matches PyTorch to the same error
(float32 max abs error 1e-7 to 4e-6). Our call_function helpers (``_prompt_attention``,
``repeat_channels``) are plain torch code and are traced through by both. The dynamo exporter is
preferred: it is torch's maintained exporter (TorchScript export is deprecated since torch 2.9), its
graphs are 2 to 5 times smaller (ViT-S/16 vpt_shallow: 1369 nodes against 4129; Swin-T: 782 against
3619) because it optimises the ONNX graph, and it is the only one that exports the graphs of our
torch.export front end (Hugging Face BERT with lora or dual_utuner: TorchScript cannot trace their
SymInt ops and calls train(), which they refuse). It costs more time (2 to 40 s per model against
0.2 to 5 s on 2 CPU cores). TorchScript remains the fallback: it also traces models with
data-dependent Python control flow (taken as on the example inputs), which torch.export refuses.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from utune_fx.errors import first_line
from utune_fx.trace.modes import eval_mode  # noqa: F401  (verify.py and onnx_export.py take it from here)
from utune_fx.trace.sequence_axes import SEQUENCE_DIM, token_inputs

EXPORTERS = ("dynamo", "torchscript")
BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"
Axes = list[dict[int, str]]  # per input, its dynamic axes by name: [{0: "batch", 1: "sequence"}, ...]


class ExportModule(nn.Module):
    """``forward(*inputs, *tuner_tensors)``: the wrapped module with the named parameters taken from
    the trailing arguments, so they become ONNX graph inputs instead of initializers."""

    def __init__(self, module: nn.Module, input_count: int, tuner_names: Sequence[str] = ()):
        super().__init__()
        self.module = module
        self.input_count = input_count
        self.tuner_names = list(tuner_names)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs, tuners = tensors[: self.input_count], tensors[self.input_count :]
        if not self.tuner_names:
            output = self.module(*inputs)
        elif torch.jit.is_tracing():  # functional_call refuses the TorchScript tracer
            with _parameters_replaced(self.module, dict(zip(self.tuner_names, tuners))):
                output = self.module(*inputs)
        else:
            output = torch.func.functional_call(self.module, dict(zip(self.tuner_names, tuners)), inputs)
        return tuple(leaf for leaf in tree_leaves(output) if isinstance(leaf, torch.Tensor))


@contextlib.contextmanager
def _parameters_replaced(module: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Plain tensor attributes in place of parameters (what functional_call does, for the tracer)."""
    saved = []
    try:
        for name, tensor in tensors.items():
            owner_path, _, attribute = name.rpartition(".")
            owner = module.get_submodule(owner_path)
            saved.append((owner, attribute, owner._parameters.pop(attribute)))
            setattr(owner, attribute, tensor)
        yield
    finally:
        for owner, attribute, parameter in reversed(saved):
            delattr(owner, attribute)
            owner.register_parameter(attribute, parameter)


def batched_inputs(inputs: Sequence[torch.Tensor]) -> list[bool]:
    """Which inputs carry the batch on dim 0: the first, and any other whose dim 0 has the same size
    (an attention mask beside token ids); dim 0 of those is exported as one dynamic axis."""
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() else None
    return [batch is not None and x.dim() > 0 and x.shape[0] == batch for x in inputs]


def dynamic_axes(inputs: Sequence[torch.Tensor], sequence: bool) -> Axes:
    """Each input's dynamic axes by name: dim 0 of the batched inputs is ``batch``; with ``sequence``,
    axis 1 of the token inputs (trace/sequence_axes.py) too, one name per distinct length in the
    example (``sequence``, ``sequence_2``, ...: token ids and their mask share one, a decoder's
    shorter ids get another)."""
    lengths = list(dict.fromkeys(x.shape[SEQUENCE_DIM] for x, t in zip(inputs, token_inputs(inputs)) if t))
    names = {length: SEQUENCE_AXIS if i == 0 else f"{SEQUENCE_AXIS}_{i + 1}" for i, length in enumerate(lengths)}
    axes = []
    for x, is_batched, is_token in zip(inputs, batched_inputs(inputs), token_inputs(inputs)):
        axis = {0: BATCH_AXIS} if is_batched else {}
        if sequence and is_token:
            axis[SEQUENCE_DIM] = names[x.shape[SEQUENCE_DIM]]
        axes.append(axis)
    return axes


def input_names_of(module: nn.Module, count: int) -> list[str]:
    """Names the user knows: a GraphModule's placeholders or forward's parameters (``x``, ``ids``),
    else input_0, input_1, ..."""
    graph = getattr(module, "graph", None)
    if isinstance(graph, torch.fx.Graph):
        names = [node.name for node in graph.nodes if node.op == "placeholder"]
    else:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = [p.name for p in inspect.signature(module.forward).parameters.values() if p.kind in kinds]
    if len(names) >= count:
        return names[:count]
    return [f"input_{i}" for i in range(count)]


def output_names_for(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Both exporters print progress, graphs and deprecation warnings; we report in one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def export_dynamo(
    wrapper: ExportModule, args: tuple, opset: int, input_names: list[str], output_names: list[str], axes: Axes
) -> onnx.ModelProto:
    dims = {name: torch.export.Dim(name, min=1) for axis in axes for name in axis.values()}
    data = tuple({dim: dims[name] for dim, name in axis.items()} or None for axis in axes)
    tuners = (None,) * (len(args) - len(axes))  # tuner tensors keep their shapes
    with quiet():
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=(data + tuners,),
            custom_translation_table=library_translations() or None,
            optimize=True,
            verbose=False,
        )  # one tuple: forward takes *tensors
        _register_orphan_constants(program.model.graph)
        return program.model_proto


def library_translations() -> dict:
    """ONNX translations a model library ships for the custom ops it defines, keyed by op overload.

    transformers' mixture-of-experts layers call ``torch.ops.transformers.grouped_mm_fallback``, which
    torch's exporter cannot translate; transformers' own exporter carries the onnxscript function
    (one MatMul per expert). Only entries for the library's own namespace are taken: its overrides of
    aten ops are tuned to its exporter's other passes, not ours. Nothing is imported that the model
    did not already import.
    """
    if "transformers" not in sys.modules:
        return {}
    try:
        from transformers.exporters.exporter_onnx import _ONNX_TRANSLATION_TABLE
    except Exception:  # an older transformers without an ONNX exporter, or onnxscript missing there
        return {}
    return {op: function for op, function in _ONNX_TRANSLATION_TABLE.items() if _namespace(op) == "transformers"}


def _namespace(op) -> str | None:
    return getattr(op, "namespace", None) or getattr(getattr(op, "_schema", None), "name", "::").split("::")[0]


def _register_orphan_constants(graph) -> None:
    """Make initializers of the constants the optimizer left unregistered.

    onnxscript 0.7's rewriter names the bounds of the Clip it fuses from Min/Max after the clamped value
    (``mul_min``, ``mul_max``); when several clamps share an input (three projections clamping the same
    normalised tensor, as Gemma 4's clippable linears do) the names collide and one pair only stays
    registered (RewriteRuleSet skips a taken name without skipping the rewrite; onnxscript issue #2079).
    NameFixPass then renames the others (``mul_min_1``), which the serialised graph names but never
    defines: onnx.checker rejects it as not topologically sorted. Each such value still holds its own
    bound, so registering it restores the graph the rewriter meant; graphs without one are untouched."""
    import onnx_ir as ir

    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in node.inputs:
            if (
                value is not None
                and value.producer() is None
                and value.const_value is not None
                and not value.is_graph_input()
                and not value.is_initializer()
            ):
                base, suffix = value.name or "constant", 0
                while value.name is None or value.name in graph.initializers:
                    suffix += 1
                    value.name = f"{base}_{suffix}"
                graph.register_initializer(value)


def export_torchscript(
    wrapper: ExportModule, args: tuple, opset: int, input_names: list[str], output_names: list[str], axes: Axes
) -> onnx.ModelProto:
    named = {name: axis for name, axis in zip(input_names, axes) if axis}
    named.update({name: {0: BATCH_AXIS} for name in output_names})
    with tempfile.TemporaryDirectory() as scratch, quiet():
        path = Path(scratch) / "model.onnx"
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=named,
        )
        return onnx.load(str(path))  # also reads any external data the exporter wrote for > 2 GB


RUN = {"dynamo": export_dynamo, "torchscript": export_torchscript}


@dataclass
class Attempt:
    exporter: str
    reason: str  # one line
    op: str | None = None  # 'namespace::name' of an op without an ONNX translation


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# dynamo: "No ONNX function found for <OpOverload(op='utest.wiggle', overload='default')>"
_DISPATCH = re.compile(r"OpOverload\(op='(\w+)\.([\w.]+)', overload='\w+'\)")
# dynamo: "Error when translating node %wiggle : ... target=torch.ops.utest.wiggle.default"
_TRANSLATING = re.compile(r"translating node %\w+ .*?target=torch\.ops\.(\w+)\.(\w+)")
# torchscript: "unrecognized namespace utest::wiggle", "Exporting the operator 'aten::foo' to ONNX opset ..."
_TORCHSCRIPT_OP = re.compile(r"(?:namespace|operator) '?(\w+::\w+)'?")


def _chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return chain


def describe_failure(exporter: str, error: BaseException) -> Attempt:
    """The innermost cause in one line (the exporters wrap the real error in pages of advice),
    and the op the error names, if any."""
    chain = _chain(error)
    reason = " ".join(_ANSI.sub("", first_line(chain[-1])).split())
    op = None
    for link in chain:
        text = _ANSI.sub("", str(link))
        found = _DISPATCH.search(text) or _TRANSLATING.search(text)
        if found:
            op = f"{found.group(1)}::{found.group(2)}"
            break
        found = _TORCHSCRIPT_OP.search(text)
        if found:
            op = found.group(1)
            break
    return Attempt(exporter, reason[:300], op)


def node_calling(module: nn.Module, op: str) -> str | None:
    """The name of the fx node in ``module`` that calls ``op`` ('ns::name'), to point the user at it."""
    graph = getattr(module, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return None
    dotted = op.replace("::", ".")
    for node in graph.nodes:
        target = str(node.target)
        if node.op == "call_function" and (target == dotted or target.startswith(dotted + ".")):
            return node.name
    return None
