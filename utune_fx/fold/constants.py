"""Tuner computations that do not depend on the input become constant tensors.

    %p  = call_module[utune.vpt.3]()                   # deep prompts P_3
    %n  = call_module[blocks.3.norm1](%p)              # the block's frozen norm, replayed
    %kv = call_module[blocks.3.attn.qkv](%n) ...       # ... and its key/value projection
    %u  = call_module[utune.vpt.3.attention0](%q, %k, %v, %a, None, %k_p, %v_p)
  ->
    %k_p = get_attr[utune_constant_0];  %v_p = get_attr[utune_constant_1]
    %u  = call_module[utune.vpt.3.attention0](%q, %k, %v, %a, None, %k_p, %v_p)

Only nodes the rewriter inserted (``meta['utune_tuner']``) are evaluated; the
frozen model's own nodes are never touched. Prefix modules compute their
keys and values from parameters (and Li & Liang's MLP) inside their
forward; ``freeze`` turns those into buffers.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from utune_fx.rewrite.attention_sites import TUNER_META

CONSTANT_PREFIX = "utune_constant_"


def _varying(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on the model's inputs."""
    varying: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(arg in varying for arg in node.all_input_nodes):
            varying.add(node)
    return varying


def _evaluate(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, object]) -> object:
    """The value of a node whose inputs are all known."""
    args = fx.node.map_arg(node.args, env.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
    if node.op == "get_attr":
        return operator.attrgetter(str(node.target))(gm)
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def fold_constants(gm: fx.GraphModule) -> set[str]:
    """Replace every inserted node that does not depend on the inputs, and that an
    input-dependent node reads, by a constant buffer; returns the tuner module paths whose
    calls became constant. The module must be in eval mode (dropout is the identity)."""
    varying = _varying(gm.graph)
    env: dict[fx.Node, object] = {}
    count = sum(1 for name, _ in gm.named_buffers() if name.startswith(CONSTANT_PREFIX))
    with torch.no_grad():
        for node in list(gm.graph.nodes):
            if node in varying or node.op == "output":
                continue
            env[node] = _evaluate(gm, node, env)
            frontier = (
                TUNER_META in node.meta
                and node.op != "get_attr"
                and any(user in varying or user.op == "output" for user in node.users)
            )
            if not frontier or not isinstance(env[node], torch.Tensor):
                continue
            name = f"{CONSTANT_PREFIX}{count}"
            count += 1
            gm.register_buffer(name, env[node].detach().clone())
            with gm.graph.inserting_before(node):
                constant = gm.graph.get_attr(name)
            constant.meta.update(node.meta)
            node.replace_all_uses_with(constant)
    # a constant call's value reaches the input-dependent nodes only through the frontier
    return {
        str(node.target)
        for node in gm.graph.nodes
        if node.op == "call_module" and node not in varying and TUNER_META in node.meta
    }


def remove_dead_tuner_nodes(gm: fx.GraphModule) -> None:
    """Erase inserted nodes nothing reads any more (the frozen model's nodes stay as traced)."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            inserted = TUNER_META in node.meta or node.op == "get_attr" and str(node.target).startswith("utune")
            if not node.users and node.op not in ("output", "placeholder") and inserted:
                gm.graph.erase_node(node)
                changed = True
    gm.delete_all_unused_submodules()
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()):
        if name.startswith(CONSTANT_PREFIX) and name not in read:
            delattr(gm, name)
