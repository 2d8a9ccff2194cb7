"""torch.export front end, for models that torch.fx cannot trace.

    model (HF transformers 5.x, shape-dependent Python control flow in forward)
        -> torch.export.export(model, inputs, strict=False).module()
        -> GraphModule of aten ops, same FQNs for parameters, nn_module_stack
           on every node; the annotation pass then gives the same op kinds
           as the fx front end (aten.linear -> linear, aten.sdpa -> attention).

Shapes are specialised to the example inputs except the batch dimension,
which is left dynamic wherever the model allows it. The guard module
torch.export inserts (``_guards_fn``) is removed: the graph is annotated for
the example shapes, which is what rules match against.
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

_GUARDS = "_guards_fn"
_USER_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


class ExportFailure(Exception):
    """torch.export could not trace the model; the message is one line."""


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


def _summary(error: BaseException) -> str:
    frames = _USER_FRAME.findall(str(error))
    where = f" (at {Path(frames[-1][0]).name}:{frames[-1][1]})" if frames else ""
    return first_line(error) + where


def export_trace(model: nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    dynamic = tuple(
        {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in example_inputs
    )
    try:
        with _quiet():
            program = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic, strict=False)
    except Exception as error:
        raise ExportFailure(_summary(error)) from error
    gm = program.module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == _GUARDS and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, _GUARDS):
        delattr(gm, _GUARDS)
    gm.graph.lint()
    gm.recompile()
    return gm
