"""What utune_fx sees in a model: the report behind ``cli.py inspect``.

LoadedModel --trace--> annotated graph --find_operations--> report (dict, JSON-ready)
report --render--> tables: summary, operations you can target, op kinds,
                   opaque modules, one line per attention/mlp/block
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import fx, nn

from utune_fx.match import TARGETS, find_operations
from utune_fx.trace import node_info, trace_report

LISTED_KINDS = ("attention", "mlp", "block")  # listed one per line in the text report
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")


def _ranges(values: list[int]) -> str:
    values = sorted(set(values))
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ",".join(map(str, values))


def compress_scopes(scopes: list[str]) -> list[str]:
    """['blocks.0.attn', ..., 'blocks.11.attn'] -> ['blocks.{0..11}.attn']."""
    groups: dict[str, list[list[int]]] = defaultdict(list)
    for scope in dict.fromkeys(scopes):
        groups[_INDEX.sub("{}", scope)].append([int(i) for i in _INDEX.findall(scope)])
    compressed = []
    for template, indices in groups.items():
        if len(indices) == 1:
            compressed.append(template.format(*indices[0]))
        elif len(indices[0]) == 1:
            compressed.append(template.format("{" + _ranges([i[0] for i in indices]) + "}"))
        else:
            compressed.append(template.replace("{}", "*") + f" ({len(indices)})")
    return compressed


def _shape_text(shape: Any) -> str:
    return "x".join(map(str, shape)) if shape else "-"


def inspect_graph(gm: fx.GraphModule, model: nn.Module, name: str) -> dict[str, Any]:
    report = trace_report(gm)
    infos = [node_info(n) for n in gm.graph.nodes]
    by_kind = find_operations(gm)
    return {
        "model": name,
        "class": type(model).__name__,
        "frontend": report.frontend,
        "fx_failure": report.fx_failure,
        "trace_seconds": round(report.seconds, 4),
        "inputs": [list(s) for s in report.input_shapes],
        "parameters": sum(p.numel() for p in model.parameters()),
        "nodes": len(infos),
        "op_kinds": dict(Counter(i.op_kind for i in infos).most_common()),
        "other_ops": dict(Counter(i.op_name for i in infos if i.op_kind == "other").most_common()),
        "operations": {
            kind: {
                "count": len(by_kind[kind]),
                "scopes": compress_scopes([op.scope for op in by_kind[kind]]),
                "items": [op.as_dict() for op in by_kind[kind]],
            }
            for kind in TARGETS
        },
        "opaque": [{"path": o.path, "class": o.class_name, "reason": o.reason} for o in report.opaque],
        "sequence": report.sequence.as_dict() if report.sequence else None,
        "sequence_note": report.sequence.describe() if report.sequence else None,
    }


def _shapes_summary(items: list[dict]) -> str:
    pairs = list(dict.fromkeys((_shape_text(i["in_shape"]), _shape_text(i["out_shape"])) for i in items))
    if not pairs:
        return ""
    text = f"{pairs[0][0]} -> {pairs[0][1]}"
    return text if len(pairs) == 1 else f"{text} (+{len(pairs) - 1} more)"


def render(report: dict[str, Any], console: Console) -> None:
    inputs = ", ".join(_shape_text(s) for s in report["inputs"])
    console.print(f"[bold]{report['model']}[/bold]  ({report['class']})")
    console.print(
        f"  {report['parameters']:,} parameters · {report['nodes']:,} graph nodes · traced by "
        f"{report['frontend']} in {report['trace_seconds']:.2f} s · input {inputs}"
    )
    if report["fx_failure"]:
        console.print(f"  torch.fx could not trace it all ({report['fx_failure']}); torch.export did")
    if report.get("sequence_note"):
        console.print(f"  {report['sequence_note']}", soft_wrap=True)

    table = Table(title="Operations you can target", title_justify="left", box=None, pad_edge=False)
    for column in ("kind", "count", "scopes", "in -> out"):
        table.add_column(column, justify="right" if column == "count" else "left", overflow="fold")
    for kind, entry in report["operations"].items():
        scopes = entry["scopes"]
        shown = ", ".join(scopes[:6]) + (f", ... ({len(scopes) - 6} more)" if len(scopes) > 6 else "")
        table.add_row(kind, str(entry["count"]), shown, _shapes_summary(entry["items"]))
    console.print(table)

    kinds = " · ".join(f"{kind} {count}" for kind, count in report["op_kinds"].items())
    console.print(f"[bold]Op kinds[/bold]  {kinds}", soft_wrap=False)
    if report["other_ops"]:
        other = ", ".join(f"{name} {count}" for name, count in report["other_ops"].items())
        console.print(f"  other = {other}")

    if report["opaque"]:
        opaque = Table(title="Opaque modules (traced as one node)", title_justify="left", box=None)
        for column in ("module", "class", "why"):
            opaque.add_column(column, overflow="fold")
        for entry in report["opaque"]:
            opaque.add_row(entry["path"] or "(model)", entry["class"], entry["reason"])
        console.print(opaque)
        console.print("  rules cannot reach inside these; --frontend export may see inside them")
    else:
        console.print("[bold]Opaque modules[/bold]  none: every module was traced through")

    for kind in LISTED_KINDS:
        items = report["operations"][kind]["items"]
        if not items:
            continue
        listing = Table(title=f"{kind} ({len(items)})", title_justify="left", box=None, pad_edge=False)
        columns = ("#", "scope", "in -> out") + (("contains",) if kind == "block" else ())
        for column in columns:
            listing.add_column(column, justify="right" if column == "#" else "left", overflow="fold")
        for item in items:
            row = [
                str(item["index"]),
                item["scope"] or "(model)",
                f"{_shape_text(item['in_shape'])} -> {_shape_text(item['out_shape'])}",
            ]
            if kind == "block":
                row.append(", ".join(f"{k} {v}" for k, v in item.get("contains", {}).items()))
            listing.add_row(*row)
        console.print(listing)
