"""In-place aten ops on a graph's own temporaries, written out of place.

    p = aten.softmax(scores, -1)
    aten.masked_fill_(p, mask, 0)          # p is saved for softmax's backward
    out = aten.matmul(p, v)
    ->
    p = aten.softmax(scores, -1)
    p_1 = aten.masked_fill(p, mask, 0)
    out = aten.matmul(p_1, v)

torch.export's training IR keeps in-place ops. Inside a custom
autograd.Function (DeBERTa's and SEW-D's XSoftmax) they were harmless: its own
backward ran. Inlined into the graph, autograd refuses to differentiate
through them ("modified by an inplace operation"), and training the tuned
graph fails. Written out of place, the same values flow and autograd works.

Only a mutation of a temporary no one else can see is rewritten: the tensor is
computed by a non-aliasing op in the graph (not an input, parameter or buffer,
not a view of anything), and none of its readers takes a view of it. Every
reader after the mutation reads the new node; readers before it keep the old
value, as they did.
"""

from __future__ import annotations

import torch
from torch import fx


def _aliases(target: object) -> bool:
    """Whether an op's result may share memory with an input (a view, or an in-place op's result)."""
    schema = getattr(target, "_schema", None)
    return schema is None or any(result.alias_info is not None for result in schema.returns)


def _out_of_place(target: object) -> torch._ops.OpOverload | None:
    """``aten.masked_fill.Scalar`` for ``aten.masked_fill_.Scalar``; None where the op is not an in-place
    aten op that writes only its first argument, or has no out-of-place twin."""
    schema = getattr(target, "_schema", None)
    if not isinstance(target, torch._ops.OpOverload) or schema is None or target.namespace != "aten":
        return None
    name = schema.name.split("::")[-1]
    first, *rest = schema.arguments or [None]
    writes_first = first is not None and first.alias_info is not None and first.alias_info.is_write
    if not name.endswith("_") or name.startswith("_") or not writes_first:
        return None
    if any(a.alias_info is not None and a.alias_info.is_write for a in rest):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    twin = getattr(packet, target._overloadname, None) if packet is not None else None
    return None if twin is None or _aliases(twin) or twin._schema.is_mutable else twin


def _private_temporary(tensor: object) -> bool:
    """A value made in the graph by an op that owns its result, that no reader takes a view of."""
    if not isinstance(tensor, fx.Node) or tensor.op != "call_function" or _aliases(tensor.target):
        return False
    return all(
        user.op == "call_function" and not _aliases(user.target) or _out_of_place(user.target) for user in tensor.users
    )


def write_out_of_place(gm: fx.GraphModule) -> tuple[fx.GraphModule, bool]:
    """Rewrite in-place aten ops on private temporaries out of place; returns (gm, changed)."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    changed = False
    for node in list(gm.graph.nodes):
        twin = _out_of_place(node.target) if node.op == "call_function" else None
        if twin is None or not node.args or not _private_temporary(node.args[0]):
            continue
        mutated = node.args[0]
        with gm.graph.inserting_before(node):
            fresh = gm.graph.call_function(twin, node.args, node.kwargs)
        fresh.meta = dict(node.meta)
        node.replace_all_uses_with(fresh)
        for reader in list(mutated.users):
            if reader is not fresh and order.get(reader, -1) > order[node]:
                reader.replace_input_with(mutated, fresh)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm, changed
