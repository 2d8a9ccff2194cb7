"""An op that uses a submodule's weights belongs to that submodule.

nn.MultiheadAttention (through F.multi_head_attention_forward) and torchvision's Swin attention call
``linear(x, self.out_proj.weight, self.out_proj.bias)`` themselves, so no call of the submodule
records its scope:

    before:  %linear_1 = aten.linear(%reshape, %mha.out_proj.weight, %mha.out_proj.bias)
             nn_module_stack: ..., ('mha', MultiheadAttention)
    after:   nn_module_stack: ..., ('mha', MultiheadAttention), ('mha.out_proj', Linear)

so scope globs, the report and the tuners' names read ``mha.out_proj``. Only a weighted op (linear,
conv, matmul, embedding, norm) whose parameters all belong to one module below its recorded scope
moves there; parameters seen through ops on parameters alone (``w.t()``, ``w.to(dtype)``) count as
the parameter. A packed weight the module owns itself (``in_proj_weight``) keeps its scope.
"""

from __future__ import annotations

from torch import fx, nn

from utune_fx.trace.opkinds import KIND_OF_NAME, op_name

_WEIGHTED = frozenset({"linear", "conv", "matmul", "embedding", "norm"})


def _innermost(stack: dict) -> str:
    return next((path for path, _ in reversed(list(stack.values())) if path), "")


def scope_ops_by_weight_owner(gm: fx.GraphModule) -> None:
    """Extend the recorded module stack of such ops to the module that owns their weights (in place)."""
    modules = dict(gm.named_modules())
    owner: dict[fx.Node, str | None] = {}  # computed from parameters alone -> their module (None: several)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            path = str(node.target).rpartition(".")[0]
            owner[node] = path if path in modules else None
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        inputs = node.all_input_nodes
        owners = {owner[n] for n in inputs if n in owner}
        single = owners.pop() if len(owners) == 1 else None
        if inputs and all(n in owner for n in inputs):
            owner[node] = single
        stack = node.meta.get("nn_module_stack")
        if single is None or not stack or KIND_OF_NAME.get(op_name(node)) not in _WEIGHTED:
            continue
        scope = _innermost(stack)
        if single == scope or not single.startswith(f"{scope}." if scope else ""):
            continue
        node.meta["nn_module_stack"] = {**stack, **_entries_below(scope, single, modules)}


def _entries_below(scope: str, path: str, modules: dict[str, nn.Module]) -> dict[str, tuple[str, type]]:
    """Module stack entries from just below ``scope`` down to ``path``."""
    parts = path.split(".")
    start = len(scope.split(".")) if scope else 0
    entries = {}
    for end in range(start + 1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            entries[f"weight_owner:{prefix}"] = (prefix, type(modules[prefix]))
    return entries
