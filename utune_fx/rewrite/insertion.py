"""Put one tuner module into the graph: call it on what it reads, add its output to the node it
writes, and point the written node's readers at the sum.

    before:  y = op(x)              z = next(y)
    after:   y = op(x)   u = tuner(x)   total = y + u   z = next(total)
             (u = reshape_as(u, y) between, where the tuner reads tokens in another layout)

The call goes after both y and x in graph order (a parallel tuner may read a tensor computed after
the output it adds to: Hugging Face Hiera pools its skip after the attention); a reader of y that
comes before that point is a one-line error.

A tuner reads what the operation reads now: where an earlier tuner already added to the tensor it
reads (a block tuner on the previous block's output), it reads that sum, as the block itself does.
"""

from __future__ import annotations

import operator
from dataclasses import replace

from torch import fx, nn

from utune_fx.errors import UtuneError
from utune_fx.rewrite.attention_sites import TUNER_META
from utune_fx.trace import node_info
from utune_fx.trace.annotate import META_KEY


def annotate(node: fx.Node, like: fx.Node, kind: str, name: str, tag: dict) -> None:
    info = node_info(like)
    node.meta[META_KEY] = replace(info, op_kind=kind, op_name=name, attention=None, part_of=None, item_shapes=())
    node.meta[TUNER_META] = tag


TUNER_SUMS = "utune_tuner_sums"


def current(node, sums: dict):
    while isinstance(node, fx.Node) and node in sums:
        node = sums[node]
    return node


def insert_tuner(
    gm: fx.GraphModule,
    path: str,
    module: nn.Module,
    reads: tuple[fx.Node, ...],
    writes: fx.Node,
    tag: dict,
    reshape: bool,
) -> None:
    sums = gm.meta.setdefault(TUNER_SUMS, {})  # written node -> the sum its readers now read
    reads = tuple(current(r, sums) if r is not writes else r for r in reads)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}  # one walk: where to insert, and the check
    after = max(
        (writes, *(r for r in reads if isinstance(r, fx.Node))), key=order.__getitem__
    )  # reads may hold scalars
    early = [user.name for user in writes.users if order[user] <= order[after]]
    if early:
        raise UtuneError(
            f"the tuner {path} reads {reads[0].name}, which the graph computes after {early[0]} reads "
            f"{writes.name}, the output it adds to; tune another operation there"
        )
    gm.add_submodule(path, module)
    with gm.graph.inserting_after(after):
        call = gm.graph.call_module(path, reads)
    update = call
    if reshape:
        with gm.graph.inserting_after(call):
            update = gm.graph.call_method("reshape_as", (call, writes))
        annotate(update, writes, "reshape", "reshape_as", tag)
    with gm.graph.inserting_after(update):
        total = gm.graph.call_function(operator.add, (writes, update))
    writes.replace_all_uses_with(total, delete_user_cb=lambda user: user not in (call, update, total))
    sums[writes] = total
    annotate(call, reads[0], "tuner", type(module).__name__, tag)
    annotate(total, writes, "add", "add", tag)
