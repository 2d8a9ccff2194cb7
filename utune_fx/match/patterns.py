"""Operation patterns: what a rule selects, compiled from YAML.

    node:     {kind: linear, scope: "blocks.*.attn.qkv"}     one node per region
    graph:    nodes + edges ("qkv ->* attn", "attn -> drop")  a subgraph with named captures
    scope:    "blocks.*.attn"                                  every node one module produced
    residual: {contains: [attention]}                          add(x, f(x))
    block:    {contains: [attention, mlp]}                     the residuals of one module
    any_of:   [attention_graph, attention_module]              union
    pattern:  mlp                                              a reference (to add modifiers)
    within:   <pattern>                                        modifier: inside another's regions
    outside:  <pattern>                                        modifier: inside none of another's regions

Every form yields :class:`Region` s; ``explain`` returns the closest
near-miss (which predicate failed on which node) when nothing matches.
Graph patterns live in :mod:`.graph_pattern`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import fx

from utune_fx.match.globs import ScopeGlob
from utune_fx.match.predicates import NodeContext, Predicate, compile_predicate, data_inputs
from utune_fx.match.source import Located
from utune_fx.match.structure import Region, common_scope, find_residuals, group_blocks
from utune_fx.trace import node_info

FORMS = ("node", "graph", "scope", "residual", "block", "any_of", "pattern")
MODIFIERS = ("within", "outside", "description")


class MatchContext:
    """One annotated graph, with the indexes and caches the patterns share."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.order = {node: i for i, node in enumerate(self.nodes)}
        self.by_name = {node.name: node for node in self.nodes}
        self.by_kind: dict[str, list[fx.Node]] = {}
        for node in self.nodes:
            self.by_kind.setdefault(node_info(node).op_kind, []).append(node)
        self.node_ctx = NodeContext(dict(gm.named_modules()), _feeding_output(self.nodes))
        self.node_ctx.vocabularies = _vocabularies(self)
        # id -> (pattern, regions): holding the pattern keeps its id from being reused
        self._regions: dict[int, tuple[Pattern, list[Region]]] = {}
        self._residuals: list[Region] | None = None
        self._input_dependent: set[fx.Node] | None = None

    def candidates(self, predicate: Predicate) -> list[fx.Node]:
        if predicate.kinds is None:
            return self.nodes
        found = [n for kind in predicate.kinds for n in self.by_kind.get(kind, [])]
        return sorted(found, key=self.order.__getitem__)

    def regions(self, pattern: Pattern) -> list[Region]:
        """A pattern's regions in graph order, numbered; computed once per graph."""
        key = id(pattern)
        if key not in self._regions:
            found = sorted(pattern.find(self), key=lambda r: self.order[r.anchor])
            for index, region in enumerate(found):
                region.index = index
            self._regions[key] = (pattern, found)
        return self._regions[key][1]

    def input_dependent(self) -> set[fx.Node]:
        """Nodes the graph's inputs reach (the rest is computed from parameters and constants)."""
        if self._input_dependent is None:
            found: set[fx.Node] = set()
            for node in self.nodes:  # graph order: a node's inputs come before it
                if node.op == "placeholder" or any(i in found for i in node.all_input_nodes):
                    found.add(node)
            self._input_dependent = found
        return self._input_dependent

    def residuals(self) -> list[Region]:
        if self._residuals is None:
            self._residuals = find_residuals(self.gm)
        return self._residuals


_ID_STEPS = ("reshape", "permute", "getitem", "cast", "identity")  # between an input and the ids it holds


def _vocabularies(ctx: MatchContext) -> frozenset[int]:
    """Rows of every embedding table looked up with ids that are a model input (token ids, not the
    positions a model counts itself), or a layout move of one."""
    from utune_fx.match.sizes import layer_channels, layer_input  # sizes builds on this module

    sizes = set()
    for node in ctx.by_kind.get("embedding", []):
        ids = layer_input(node)
        for _ in range(4):
            if ids is None or ids.op == "placeholder" or node_info(ids).op_kind not in _ID_STEPS:
                break
            ids = next(iter(data_inputs(ids)), None)
        channels = layer_channels(node, ctx)
        if ids is not None and ids.op == "placeholder" and channels:
            sizes.add(channels[0])
    return frozenset(sizes)


def _feeding_output(nodes: list[fx.Node]) -> set[fx.Node]:
    """Nodes whose value reaches the output through unweighted ops only (the head)."""
    output = next(n for n in reversed(nodes) if n.op == "output")
    found, frontier = set(), list(output.all_input_nodes)
    while frontier:
        node = frontier.pop()
        if node in found:
            continue
        found.add(node)
        kind = node_info(node).op_kind
        # a bias or scale on the logits (BART's final_logits_bias) keeps the classifier the head
        if kind in ("add", "sub", "mul", "div", "arith") and len(data_inputs(node)) == 1:
            frontier.extend(data_inputs(node))
        elif kind in (
            "reshape",
            "permute",
            "getitem",
            "dropout",
            "identity",
            "cast",
            "reduce",
            "pool",
            "norm",
            "act",
            "softmax",
        ):
            frontier.extend(data_inputs(node))
    return found


def region_of(
    pattern: str,
    anchor: fx.Node,
    nodes: set[fx.Node],
    output: fx.Node,
    captures: dict[str, tuple[fx.Node, ...]] | None = None,
    inputs: list[fx.Node] | None = None,
) -> Region:
    """A region from its nodes: inputs are the data it reads from outside."""
    if inputs is None:
        inputs = [i for n in nodes for i in data_inputs(n) if i not in nodes]
    return Region(
        pattern,
        0,
        common_scope([node_info(n).scope for n in nodes]),
        anchor,
        tuple(dict.fromkeys(inputs)),
        output,
        frozenset(nodes),
        captures or {},
    )


def merge_by_output(regions: list[Region], ctx: MatchContext) -> list[Region]:
    """Regions that end at one output node are one operation computed in parts: DiffLlama's
    differential attention (two attention maps, subtracted before one output projection) is one
    attention, not two."""
    by_output: dict[fx.Node, Region] = {}
    for region in regions:
        first = by_output.get(region.output)
        if first is None:
            by_output[region.output] = region
            continue
        nodes = first.nodes | region.nodes
        captures = {
            name: tuple(dict.fromkeys((*first.captures.get(name, ()), *region.captures.get(name, ()))))
            for name in dict.fromkeys((*first.captures, *region.captures))
        }
        first.nodes, first.captures = nodes, captures
        first.inputs = tuple(dict.fromkeys((*first.inputs, *region.inputs)))
        first.scope = common_scope(
            [node_info(n).scope for n in nodes if n in ctx.input_dependent()] or [node_info(n).scope for n in nodes]
        )
    return list(by_output.values())


@dataclass
class Pattern(abc.ABC):
    name: str
    within: Pattern | None = field(default=None, kw_only=True)
    outside: Pattern | None = field(default=None, kw_only=True)
    origin: str = field(default="", kw_only=True)  # 'file:line:col: key' of its definition, for messages

    def find(self, ctx: MatchContext) -> list[Region]:
        regions = self.find_all(ctx)
        if self.within is not None:
            inside = set().union(*(r.nodes for r in ctx.regions(self.within)))
            regions = [r for r in regions if r.anchor in inside]
        if self.outside is not None:  # inside another region: a pattern may name itself (the outermost)
            others = ctx.regions(self.outside)
            regions = [r for r in regions if not any(r.anchor in o.nodes and o.anchor is not r.anchor for o in others)]
        return regions

    @abc.abstractmethod
    def find_all(self, ctx: MatchContext) -> list[Region]:
        """Every region, before the 'within' modifier."""

    def explain(self, ctx: MatchContext) -> str:
        """Why nothing matched: the closest near-miss."""
        found = self.find_all(ctx) if self.within is not None or self.outside is not None else []
        if found:
            where = " and ".join(
                f"{word} '{pattern.name}'"
                for word, pattern in (("within", self.within), ("outside", self.outside))
                if pattern is not None
            )
            return f"{len(found)} region(s) found, none {where}"
        return self.near_miss(ctx)

    def near_miss(self, ctx: MatchContext) -> str:
        return "no candidate"


def best_near_miss(predicate: Predicate, nodes: list[fx.Node], ctx: MatchContext, label: str = "") -> str:
    best: tuple[int, str, fx.Node] | None = None
    for node in nodes:
        passed, reason = predicate.score(node, ctx.node_ctx)
        if reason is not None and (best is None or passed > best[0]):
            best = (passed, reason, node)
    if best is None:
        return f"{label}no node to test" if not nodes else f"{label}every candidate matched"
    _, reason, node = best
    scope = node_info(node).scope
    return f"{label}closest: node {node.name} ({scope or 'model'}): {reason}"


@dataclass
class NodePattern(Pattern):
    predicate: Predicate

    def find_all(self, ctx: MatchContext) -> list[Region]:
        return [
            region_of(self.name, n, {n}, n)
            for n in ctx.candidates(self.predicate)
            if self.predicate(n, ctx.node_ctx) is None
        ]

    def near_miss(self, ctx: MatchContext) -> str:
        return best_near_miss(self.predicate, ctx.nodes, ctx)


@dataclass
class ScopePattern(Pattern):
    glob: str

    def find_all(self, ctx: MatchContext) -> list[Region]:
        glob = ScopeGlob(self.glob)
        root = "" if glob.fullmatch("") else None  # '**' also takes what the model itself computes
        groups: dict[str, set[fx.Node]] = {}
        for node in ctx.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            path = next((p for p, _ in node_info(node).scope_stack if glob.fullmatch(p)), root)
            if path is not None:
                groups.setdefault(path, set()).add(node)
        regions = []
        for path, nodes in groups.items():
            leaving = [n for n in nodes if any(u not in nodes for u in n.users)]
            output = max(leaving or nodes, key=ctx.order.__getitem__)
            region = region_of(self.name, output, nodes, output)
            region.scope = path
            regions.append(region)
        return regions

    def near_miss(self, ctx: MatchContext) -> str:
        scopes = sorted({p for n in ctx.nodes for p, _ in node_info(n).scope_stack})
        import difflib

        close = difflib.get_close_matches(self.glob, scopes, n=3, cutoff=0.4)
        return f"no module path matches '{self.glob}'" + (f"; close: {', '.join(close)}" if close else "")


@dataclass
class ContainerPattern(Pattern):
    """residual / block: structural regions holding a match of each inner pattern."""

    kind: str  # 'residual' or 'block'
    contains: list[Pattern]

    def find_all(self, ctx: MatchContext) -> list[Region]:
        residuals = ctx.residuals()
        candidates = residuals if self.kind == "residual" else group_blocks(residuals)
        anchors = {p.name: {r.anchor for r in ctx.regions(p)} for p in self.contains}
        regions = []
        for candidate in candidates:
            held = {name: len(found & candidate.nodes) for name, found in anchors.items()}
            if all(held.values()):
                regions.append(
                    Region(
                        self.name,
                        0,
                        candidate.scope,
                        candidate.anchor,
                        candidate.inputs,
                        candidate.output,
                        candidate.nodes,
                        contains=held,
                    )
                )
        return regions

    def near_miss(self, ctx: MatchContext) -> str:
        residuals = ctx.residuals()
        if not residuals:
            return "the graph has no residual add (add(x, f(x)) with f holding a weighted op)"
        missing = [p.name for p in self.contains if not ctx.regions(p)]
        if missing:
            return f"{len(residuals)} residual(s), but '{missing[0]}' matches nothing: {self.contains[0].explain(ctx)}"
        return f"{len(residuals)} residual(s), none holds a match of each of {[p.name for p in self.contains]}"


@dataclass
class AnyOfPattern(Pattern):
    options: list[Pattern]

    def find_all(self, ctx: MatchContext) -> list[Region]:
        seen, regions = set(), []
        for option in self.options:
            for region in ctx.regions(option):
                if region.anchor not in seen:
                    seen.add(region.anchor)
                    regions.append(replace(region, pattern=self.name))
        return regions

    def near_miss(self, ctx: MatchContext) -> str:
        return "; ".join(f"{o.name}: {o.explain(ctx)}" for o in self.options)


@dataclass
class RefPattern(Pattern):
    target: Pattern

    def find_all(self, ctx: MatchContext) -> list[Region]:
        return [replace(region, pattern=self.name) for region in ctx.regions(self.target)]

    def near_miss(self, ctx: MatchContext) -> str:
        return self.target.explain(ctx)


Resolve = Callable[[Located], Pattern]


def compile_pattern(value: Located, name: str, resolve: Resolve) -> Pattern:
    """One pattern definition (a mapping with exactly one form key)."""
    pattern = _compile_form(value, name, resolve)
    pattern.origin = f"{value.where}: {value.key or name}"
    return pattern


def _compile_form(value: Located, name: str, resolve: Resolve) -> Pattern:
    from utune_fx.match.graph_pattern import compile_graph  # here: graph_pattern imports this module

    entries = value.check_keys(FORMS + MODIFIERS)
    forms = [key for key in FORMS if key in entries]
    if len(forms) != 1:
        raise value.fail(f"a pattern needs exactly one of {', '.join(FORMS)}; found {forms or 'none'}")
    form, body = forms[0], entries[forms[0]]
    within = resolve(entries["within"]) if "within" in entries else None
    outside = resolve(entries["outside"]) if "outside" in entries else None
    if form == "node":
        return NodePattern(name, compile_predicate(body), within=within, outside=outside)
    if form == "graph":
        return compile_graph(body, name, within, outside)
    if form == "scope":
        return ScopePattern(name, body.name("a scope glob"), within=within, outside=outside)
    if form in ("residual", "block"):
        fields = body.check_keys(("contains",))
        inner = [resolve(item) for item in fields["contains"].items()] if "contains" in fields else []
        return ContainerPattern(name, form, inner, within=within, outside=outside)
    if form == "any_of":
        options = [resolve(item) for item in body.items()]
        if not options:
            raise body.fail("any_of needs at least one pattern")
        return AnyOfPattern(name, options, within=within, outside=outside)
    return RefPattern(name, resolve(body), within=within, outside=outside)
