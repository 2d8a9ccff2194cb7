"""Node predicates: small composable tests on one annotated node.

    {kind: [linear, conv], scope: "blocks.*.mlp.*", rank: 3}
        -> all_of(kind_in{linear, conv}, scope_glob, rank == 3)
    {any_of: [{kind: linear}, {kind: conv, pointwise: true}], not: {scope: head}}

A predicate returns None when the node passes and otherwise the reason it
fails ('kind is norm, not linear|conv'): the matcher's ``--explain`` shows
the reason of the closest near-miss. Predicates are compiled and checked
when the rule file loads; unknown keys and op kinds are located errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from utune_fx.match.globs import ClassGlob, ScopeGlob
from utune_fx.match.source import Located
from utune_fx.trace import OP_KINDS, node_info
from utune_fx.trace.annotate import composite_input

Check = Callable[[fx.Node, "NodeContext"], "str | None"]
_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")


@dataclass
class NodeContext:
    """What predicates may look at besides the node itself."""

    modules: dict[str, nn.Module]
    feeds_output: set[fx.Node]  # nodes whose value reaches the graph output through unweighted ops only
    vocabularies: frozenset[int] = frozenset()  # rows of the embedding tables that read the input token ids


def _strings(value: Located, what: str) -> list[str]:
    items = value.items() if isinstance(value.value, list) else [value]
    return [item.text() for item in items]


def _globs(value: Located, what: str) -> list[str]:
    """Globs, each within the name-length limit (matching costs up to glob x name length)."""
    items = value.items() if isinstance(value.value, list) else [value]
    return [item.name(f"a {what} glob") for item in items]


def _one_of(value: Located, allowed: tuple[str, ...], what: str) -> list[str]:
    names = _strings(value, what)
    for name in names:
        if name not in allowed:
            import difflib

            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise value.fail(f"unknown {what} '{name}'; {hint}valid: {', '.join(allowed)}")
    return names


def _module(node: fx.Node, ctx: NodeContext) -> nn.Module | None:
    return ctx.modules.get(str(node.target)) if node.op == "call_module" else None


def _class_names(node: fx.Node, ctx: NodeContext) -> tuple[str, str]:
    module = _module(node, ctx)
    if module is not None:
        cls = type(module)
        return cls.__name__, f"{cls.__module__}.{cls.__qualname__}"
    stack = node_info(node).scope_stack
    qualname = stack[-1][1] if stack else ""
    return qualname.rsplit(".", 1)[-1], qualname


def _is_pointwise(node: fx.Node, ctx: NodeContext) -> bool:
    info = node_info(node)
    if info.op_kind == "linear":
        return True
    if info.op_kind != "conv":
        return False
    module = _module(node, ctx)
    if module is not None:
        return set(module.kernel_size) == {1} and module.groups == 1
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    shape = node_info(weight).shape if isinstance(weight, fx.Node) else None
    return bool(shape) and set(shape[2:]) <= {1} and groups == 1


def _is_depthwise(node: fx.Node, ctx: NodeContext) -> bool:
    """A depthwise conv: one filter per channel (groups == in == out channels > 1), so it
    mixes positions (tokens on their grid) but never channels."""
    if node_info(node).op_kind != "conv":
        return False
    module = _module(node, ctx)
    if module is not None:
        groups, c_in, c_out = module.groups, module.in_channels, module.out_channels
    else:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        shape = node_info(weight).shape if isinstance(weight, fx.Node) else None
        if not shape or len(shape) < 2 or not isinstance(groups, int):
            return False
        c_out, c_in = shape[0], shape[1] * groups
    return groups > 1 and groups == c_in == c_out


def is_weight(node: fx.Node) -> bool:
    """A parameter or constant, possibly seen through layout ops (gamma.reshape(1, -1, 1, 1))."""
    while node_info(node).op_kind in ("permute", "reshape", "cast", "identity") and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node_info(node).op_kind in ("param", "constant")


# ops that read a tensor's shape, dtype and device only: x.new_ones(...) builds DeepSeek-V3.2's sparse
# attention mask, which no feature flows through; a.expand_as(b) reads b's shape (XLM's position
# embeddings, expanded to the token embeddings' shape, are no branch of them)
METADATA_ONLY = frozenset(
    {"new_ones", "new_zeros", "new_full", "new_empty", "zeros_like", "ones_like", "full_like", "empty_like"}
)
SHAPED_LIKE = frozenset({"expand_as", "view_as", "reshape_as", "type_as"})  # data: the first argument only


def _carries_tensor(node: fx.Node) -> bool:
    return node_info(node).shape is not None or bool(node_info(node).item_shapes)


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs that carry tensors (shape arithmetic is not data flow, nor is a tensor read for its metadata)."""
    op_name = node_info(node).op_name
    if op_name in METADATA_ONLY:
        return []
    inputs = node.all_input_nodes
    if op_name in SHAPED_LIKE and node.args and isinstance(node.args[0], fx.Node):
        inputs = [node.args[0]]
    return [n for n in inputs if _carries_tensor(n)]


def tensor_users(node: fx.Node) -> list[fx.Node]:
    """Users that compute tensors from this node (not x.shape and its arithmetic, nor x.new_ones(...))."""
    return [u for u in node.users if _carries_tensor(u) and node in tensor_inputs(u)]


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """Tensor inputs that are not weights; for a written-out act or norm, the tensor its formula reads."""
    written_out = composite_input(node)
    return [written_out] if written_out is not None else [n for n in tensor_inputs(node) if not is_weight(n)]


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def _compile_key(key: str, value: Located) -> Check:
    if key == "kind":
        kinds = set(_one_of(value, OP_KINDS, "op kind"))
        return lambda n, c: (
            None if node_info(n).op_kind in kinds else f"kind is {node_info(n).op_kind}, not {'|'.join(sorted(kinds))}"
        )
    if key == "op":
        names = set(_strings(value, "op"))
        return lambda n, c: (
            None if node_info(n).op_name in names else f"op is {node_info(n).op_name}, not {'|'.join(sorted(names))}"
        )
    if key == "class":
        globs = [ClassGlob(g) for g in _globs(value, "class")]

        def check_class(n: fx.Node, c: NodeContext) -> str | None:
            short, qualified = _class_names(n, c)
            return (
                None
                if any(g.fullmatch(short) or g.fullmatch(qualified) for g in globs)
                else f"class is {short or '(model)'}"
            )

        return check_class
    if key in ("scope", "inside"):
        globs = [ScopeGlob(g) for g in _globs(value, key)]
        if key == "scope":
            return lambda n, c: (
                None if any(g.fullmatch(node_info(n).scope) for g in globs) else f"scope is '{node_info(n).scope}'"
            )

        def check_inside(n: fx.Node, c: NodeContext) -> str | None:
            paths = [path for path, _ in node_info(n).scope_stack]
            return None if any(g.fullmatch(p) for g in globs for p in paths) else f"not inside {value.plain()}"

        return check_inside
    if key == "rank":
        entries = value.items() if isinstance(value.value, list) else [value]
        for entry in entries:
            if not isinstance(entry.value, int) or isinstance(entry.value, bool):
                raise entry.fail("rank must be an integer or a list of integers")
        ranks = {entry.value for entry in entries}

        def check_rank(n: fx.Node, c: NodeContext) -> str | None:
            shape = node_info(n).shape
            return (
                None
                if shape is not None and len(shape) in ranks
                else f"rank is {len(shape) if shape is not None else 'none'}"
            )

        return check_rank
    if key == "shape":
        dims = [d.value for d in value.items()]
        if not all(d is None or d == "*" or isinstance(d, int) and not isinstance(d, bool) for d in dims):
            raise value.fail("shape entries must be integers, or null / '*' for any size")

        def check_shape(n: fx.Node, c: NodeContext) -> str | None:
            shape = node_info(n).shape
            ok = (
                shape is not None
                and len(shape) == len(dims)
                and all(d in (None, "*") or d == s for d, s in zip(dims, shape))
            )
            return None if ok else f"shape is {list(shape) if shape is not None else 'none'}"

        return check_shape
    if key == "dtype":
        dtypes = set(_one_of(value, _DTYPES, "dtype"))
        return lambda n, c: None if node_info(n).dtype in dtypes else f"dtype is {node_info(n).dtype}"
    if key == "attr":
        wanted = {k: _normalise(v.plain()) for k, v in value.mapping().items()}

        def check_attr(n: fx.Node, c: NodeContext) -> str | None:
            module = _module(n, c)
            if module is None:
                return "not a module call, so it has no attributes"
            for name, expected in wanted.items():
                actual = _normalise(getattr(module, name, "<missing>"))
                if actual != expected:
                    return f"{name} is {actual}, not {expected}"
            return None

        return check_attr
    if key in ("pointwise", "depthwise", "module", "feeds_output", "token_logits"):
        if not isinstance(value.value, bool):
            raise value.fail(f"{key} must be true or false")
        want = value.value
        test = {
            "pointwise": lambda n, c: _is_pointwise(n, c),
            "depthwise": _is_depthwise,
            "module": lambda n, c: n.op == "call_module",
            "feeds_output": lambda n, c: n in c.feeds_output,
            "token_logits": _token_logits,
        }[key]
        return lambda n, c: None if test(n, c) == want else f"{key} is {not want}"
    if key == "data_inputs":
        if not isinstance(value.value, int) or isinstance(value.value, bool):
            raise value.fail("data_inputs must be an integer")
        count = value.value
        return lambda n, c: None if len(data_inputs(n)) == count else f"has {len(data_inputs(n))} data inputs"
    if key == "any_of":
        options = [compile_predicate(item) for item in value.items()]
        if not options:
            raise value.fail("any_of needs at least one predicate")

        def check_any(n: fx.Node, c: NodeContext) -> str | None:
            reasons = [option(n, c) for option in options]
            return None if any(r is None for r in reasons) else " and ".join(reasons)

        return check_any
    if key == "not":
        inner = compile_predicate(value)
        return lambda n, c: "matches the 'not' predicate" if inner(n, c) is None else None
    raise AssertionError(key)


PREDICATE_KEYS = (
    "kind",
    "op",
    "class",
    "scope",
    "inside",
    "rank",
    "shape",
    "dtype",
    "attr",
    "pointwise",
    "depthwise",
    "module",
    "data_inputs",
    "feeds_output",
    "token_logits",
    "any_of",
    "not",
)


def _token_logits(node: fx.Node, ctx: NodeContext) -> bool:
    """A layer with one output per row of the table the input tokens are looked up in: a language
    model's head (GPT-2's lm_head, BERT's MLM decoder), which predicts tokens rather than classes."""
    shape = node_info(node).shape
    return bool(shape) and shape[-1] in ctx.vocabularies


class Predicate:
    """All of its checks must pass; ``{}`` matches any node."""

    def __init__(self, checks: list[tuple[str, Check]], kinds: frozenset[str] | None):
        self.checks = checks  # (key, check)
        self.kinds = kinds  # the op kinds it can match, when it says (lets the matcher index)

    def __call__(self, node: fx.Node, ctx: NodeContext) -> str | None:
        for _, check in self.checks:
            reason = check(node, ctx)
            if reason is not None:
                return reason
        return None

    def score(self, node: fx.Node, ctx: NodeContext) -> tuple[int, str | None]:
        """(weight of the checks passed, first failure): how close a near-miss
        came; the op kind counts most, as it says what the author meant."""
        passed, first = 0, None
        for key, check in self.checks:
            reason = check(node, ctx)
            if reason is None:
                passed += 3 if key == "kind" else 1
            elif first is None:
                first = reason
        return passed, first


def compile_predicate(value: Located) -> Predicate:
    entries = value.check_keys(PREDICATE_KEYS)
    kinds = frozenset(_strings(entries["kind"], "kind")) if "kind" in entries else None
    return Predicate([(key, _compile_key(key, entry)) for key, entry in entries.items()], kinds)
