"""torch.export front end, for models that torch.fx cannot trace.

    model (HF transformers 5.x, shape-dependent Python control flow in forward)
        -> torch.export.export(model, inputs, strict=False).module()
        -> GraphModule of aten ops, same FQNs for parameters, nn_module_stack
           on every node; the annotation pass then gives the same op kinds
           as the fx front end (aten.linear -> linear, aten.sdpa -> attention).

Shapes are specialised to the example inputs except the batch dimension,
which is left dynamic wherever the model allows it, and the sequence axis of
token inputs (sequence_axes.py): dynamic too unless torch.export specialises
it, in which case the model is traced again with the sequence fixed and the
graph's ``meta[SEQUENCE_KEY]`` says why. The guard module
torch.export inserts (``_guards_fn``) is removed: the graph is annotated for
the example shapes, which is what rules match against; so are the dtype
checks before each ``.to`` (``_assert_tensor_metadata``). In-place ops on the
graph's own temporaries are written out of place (out_of_place.py), so
autograd can train through them.

    GPT2LMHeadModel (config.use_cache=True: outputs hold a DynamicCache)
        -> traced under kv_cache_off: every config the model's modules hold
           has use_cache=False while tracing, restored after; the graph
           returns the logits without the cache (fine-tuning never reads it)
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from utune_fx.errors import first_line
from utune_fx.trace.out_of_place import write_out_of_place
from utune_fx.trace.sequence_axes import SEQUENCE_DIM, SequenceAxis, specialisation_reason, token_inputs

_GUARDS = "_guards_fn"
SEQUENCE_KEY = "utune_sequence"
# checks export adds before a .to(dtype): they hold the dtype a tensor had while tracing, so a
# graph traced under one default dtype fails under another (VITS' torch.randn(...).to(x.dtype))
_METADATA_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)
_USER_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


_CACHE_IN_OUTPUT = re.compile(r"Found <class '[\w.]*?(\w+)'> in output")


class ExportFailure(Exception):
    """torch.export could not trace the model; the message is one line, ``fix`` what to do when known."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.fix = fix


@contextlib.contextmanager
def kv_cache_off(model: nn.Module) -> Iterator[list[str]]:
    """``use_cache`` off on every config the model's modules hold (Hugging Face models), restored
    after; yields one line per config switched, for the trace report. A KV cache is an output
    torch.export cannot return, and training never reads it."""
    configs = {id(c): c for m in model.modules() if getattr(c := getattr(m, "config", None), "use_cache", None)}
    before = {key: config.use_cache for key, config in configs.items()}
    try:
        for config in configs.values():
            config.use_cache = False
        yield [
            f"{type(c).__name__}.use_cache=False (restored after tracing: the graph returns no KV cache)"
            for c in configs.values()
        ]
    finally:
        for key, config in configs.items():
            config.use_cache = before[key]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """A failed export prints its partial graph and warnings to stderr; the
    caller reports the failure in one line instead."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _failure(error: BaseException) -> ExportFailure:
    cache = _CACHE_IN_OUTPUT.search(str(error))
    if cache:  # torch's advice (register a pytree) is not what a user of a model wants
        return ExportFailure(
            f"the model returns a {cache.group(1)}, which torch.export cannot return",
            f"call the model with use_cache=False (or set it in its config): fine-tuning needs no {cache.group(1)}",
        )
    return ExportFailure(_summary(error))


def _summary(error: BaseException) -> str:
    frames = _USER_FRAME.findall(str(error))
    where = f" (at {Path(frames[-1][0]).name}:{frames[-1][1]})" if frames else ""
    return first_line(error) + where


def export_trace(model: nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """The torch.export graph, batch dynamic and, where the model allows it, the sequence axis of its
    token inputs too (sequence_axes.py); ``gm.meta[SEQUENCE_KEY]`` holds the SequenceAxis, or None
    for a model without token inputs."""
    tokens = token_inputs(example_inputs)
    refused = None
    if any(tokens):
        try:
            program = _export(model, example_inputs, tokens)
        except Exception as error:  # a specialised sequence, or a model torch.export cannot trace at all
            refused = error
    if not any(tokens) or refused is not None:
        try:
            program = _export(model, example_inputs, [False] * len(tokens))
        except Exception as error:
            raise _failure(error) from error
    gm = _cleaned(program.module())
    gm.meta[SEQUENCE_KEY] = _sequence_axis(gm, example_inputs, tokens, refused)
    return gm


def _export(model: nn.Module, example_inputs: Sequence[Any], tokens: list[bool]) -> torch.export.ExportedProgram:
    """Batch as Dim.AUTO (dynamic where the model allows it), a token input's axis 1 as Dim.DYNAMIC
    (torch.export raises when the model specialises it, rather than fixing it silently)."""
    dynamic = tuple(
        ({0: torch.export.Dim.AUTO} | ({SEQUENCE_DIM: torch.export.Dim.DYNAMIC} if is_token else {}))
        if isinstance(x, torch.Tensor) and x.dim() > 0
        else None
        for x, is_token in zip(example_inputs, tokens)
    )
    with _quiet():
        return torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic, strict=False)


def _cleaned(gm: fx.GraphModule) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        guard = node.op == "call_module" and node.target == _GUARDS
        if (guard or node.target in _METADATA_ASSERTS) and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, _GUARDS):
        delattr(gm, _GUARDS)
    gm.graph.lint()
    gm.recompile()
    return write_out_of_place(gm)[0]


def _sequence_axis(
    gm: fx.GraphModule, example_inputs: Sequence[Any], tokens: list[bool], refused: BaseException | None
) -> SequenceAxis | None:
    if not any(tokens):
        return None
    names = [node.name for node in gm.graph.nodes if node.op == "placeholder"]
    names = names if len(names) == len(tokens) else [f"input {i}" for i in range(len(tokens))]
    chosen = [i for i, is_token in enumerate(tokens) if is_token]
    return SequenceAxis(
        inputs=[names[i] for i in chosen],
        lengths=[int(example_inputs[i].shape[SEQUENCE_DIM]) for i in chosen],
        dynamic=refused is None,
        reason=None if refused is None else specialisation_reason(refused, names),
    )
