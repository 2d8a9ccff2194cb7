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

from typing import Any, Sequence

import torch
from torch import fx, nn

_GUARDS = "_guards_fn"


def export_trace(model: nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    dynamic = tuple(
        {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
        for x in example_inputs
    )
    program = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic, strict=False)
    gm = program.module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == _GUARDS and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, _GUARDS):
        delattr(gm, _GUARDS)
    gm.graph.lint()
    gm.recompile()
    return gm
