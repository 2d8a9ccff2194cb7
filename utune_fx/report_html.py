"""One self-contained HTML file that shows what utune_fx did to a model (``--report FILE.html``).

    collect(gm, model, ...)  ->  dict      the module tree with each module's graph ops, the matched regions
                                           (coloured by rule), the tuners with the nodes they read and write,
                                           the parameter table, fold statuses, training history
    render(data)             ->  str       HTML: <details> per module (works without JavaScript; a few
                                           lines of inline script add "expand all"), inline CSS, SVG curves
    write_report(path, data)               through a temporary name (utune_fx/atomic.py)

``match`` and ``rewrite`` write it with ``--report FILE.html``, ``train`` as OUT/report.html, ``fold`` as
OUT/report.html of the folded artifact. Nothing in the file is fetched: no URL, no font, no script from
elsewhere. Every name from the model, the rule file or the artifact is HTML-escaped.

Size stays bounded on deep models: consecutive numbered siblings that are identical (same classes,
parameters, ops, regions, tuners and fold statuses, e.g. blocks.1..95 of a ViT) are one line under the
first of them, drawn in full; past MAX_MODULES modules, MAX_OPS op chips or MAX_ROWS table rows the
rest is counted, not drawn, and the page says so.
"""

from __future__ import annotations

import html
import math
import operator
from collections import Counter
from pathlib import Path
from typing import Any

from torch import fx, nn

from utune_fx.atomic import write_text
from utune_fx.errors import UtuneError, first_line

MAX_MODULES = 3000  # module entries drawn in the tree
MAX_OPS = 6000  # op chips drawn in the tree
MAX_ROWS = 2000  # rows per table
MAX_OPENED = 40  # modules holding regions or tuners shown open (the first two levels always are)
_HIDDEN_KINDS = ("placeholder", "output", "param", "constant", "get_attr")
_TUNER_META = "utune_tuner"  # utune_fx.rewrite.attention_sites.TUNER_META (not imported: matching needs no rewriter)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _shape(shape: Any) -> str:
    return "x".join(map(str, shape)) if shape else "-"


# -- collecting ---------------------------------------------------------------------------------------------


def _info(node: fx.Node):
    return node.meta.get("utune")


def _inserted(path: str) -> bool:
    """The modules the rewriter adds live under ``utune``."""
    return path == "utune" or path.startswith("utune.")


def _module_tree(gm: fx.GraphModule, model: nn.Module | None) -> dict[str, dict]:
    """path -> {cls, params (own), children: [names]}, from the eager model and the graph's scopes."""
    modules: dict[str, dict] = {"": {"cls": type(model or gm).__name__, "params": 0, "children": []}}

    def add(path: str, cls: str) -> None:
        if path in modules:
            return
        parent, _, name = path.rpartition(".")
        if parent not in modules:
            add(parent, "")
        modules[path] = {"cls": cls, "params": 0, "children": []}
        modules[parent]["children"].append(name)

    source = model if model is not None else gm
    for path, module in source.named_modules():
        if path and not _inserted(path):
            add(path, type(module).__name__)
    for node in gm.graph.nodes:
        info = _info(node)
        if info is None:
            continue
        for path, cls in info.scope_stack:
            if path and "@" not in path and not _inserted(path):
                add(path, cls.rsplit(".", 1)[-1])
    for name, parameter in source.named_parameters():
        if name.startswith("utune."):
            continue
        owner = name.rpartition(".")[0]
        while owner not in modules:
            owner = owner.rpartition(".")[0]
        modules[owner]["params"] += parameter.numel()
    return modules


def _owner(path: str, modules: dict) -> str:
    path = path.split("@")[0]
    while path not in modules:
        path = path.rpartition(".")[0]
    return path


def _tuners(gm: fx.GraphModule, summaries: list[dict]) -> list[dict]:
    """Each tuner module call in a rewritten graph: what it reads and the node it adds to (its writes)."""
    scopes = {s["rule"]: s.get("scopes", []) for s in summaries}
    found = []
    for node in gm.graph.nodes:
        tag = node.meta.get(_TUNER_META)
        if node.op != "call_module" or tag is None or not str(node.target).startswith("utune."):
            continue
        update, users = node, list(node.users)
        if len(users) == 1 and users[0].op == "call_method" and users[0].target == "reshape_as":
            update, users = users[0], list(users[0].users)
        adds = [u for u in users if u.op == "call_function" and u.target is operator.add and u.args[1] is update]
        if len(adds) == 1:
            writes = adds[0].args[0]
            while _TUNER_META in writes.meta and writes.op == "call_function" and writes.target is operator.add:
                writes = writes.args[0]  # another tuner's sum on the same output: the output itself
            written = [writes]
        else:  # prompts, prefix keys: what reads the tuner's output
            written = [u for u in users if _TUNER_META not in u.meta] or users
        module = gm.get_submodule(str(node.target))
        index = tag.get("index", 0)
        rule_scopes = scopes.get(tag["rule"], [])
        read = [n for n in node.all_input_nodes if n.op != "get_attr"]
        found.append(
            {
                "module": str(node.target),
                "rule": tag["rule"],
                "tuner": tag.get("tuner", ""),
                "position": tag.get("position", ""),
                "cls": type(module).__name__,
                "index": index,
                "scope": rule_scopes[index] if isinstance(index, int) and index < len(rule_scopes) else None,
                "parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
                "reads": [(n.name, _info(n).scope if _info(n) else "") for n in read],
                "writes": [(n.name, _info(n).scope if _info(n) else "") for n in written],
            }
        )
    return found


def collect(
    gm: fx.GraphModule,
    model: nn.Module | None,
    *,
    name: str,
    kind: str,
    match_reports: list[dict] | None = None,
    matches: list | None = None,
    result: Any = None,
    fold_entries: list[dict] | None = None,
    fold_difference: float | None = None,
    history: list[dict] | None = None,
    summary: dict | None = None,
    manifest: dict | None = None,
) -> dict:
    """What the page shows. ``kind``: match, rewrite, train or fold. From ``match``: its reports (one per
    rule file, utune_fx.match.report.match_report) and, for node colours, the RuleMatch lists they came from;
    from the other commands: the RewriteResult (tuned graph, summaries), fold entries, training history; with
    the ``manifest`` of the artifact the result was loaded from, its recorded rule files and summaries (a loaded
    artifact's rules live in a scratch folder)."""
    modules = _module_tree(gm, model)
    rules: list[dict] = []
    regions: list[dict] = []
    node_rule: dict[str, int] = {}
    base = sum(p.numel() for n, p in (model or gm).named_parameters() if not n.startswith("utune."))
    for report in match_reports or []:
        for entry in report["results"]:
            number = len(rules)
            rules.append(
                {
                    "rule": entry["rule"],
                    "file": report["rules"],
                    "tuner": entry["tuner"],
                    "position": entry["position"],
                    "where": entry["where"],
                    "pattern": entry["pattern"],
                    "regions": len(entry["regions"]),
                    "added": entry["added_parameters"],
                    "trained": entry["trained_parameters"],
                    "note": entry.get("standby") or entry.get("near_miss") or "",
                }
            )
            for region in entry["regions"]:
                regions.append(
                    {
                        "rule": number,
                        "index": region["index"],
                        "scope": region["scope"],
                        "shapes": f"{_shape(region['in_shape'])} -> {_shape(region['out_shape'])}",
                        "added": region["added_parameters"],
                        "refused": region.get("refused", ""),
                        "inputs": region["inputs"],
                        "output": region["output"],
                    }
                )
    for found_list in matches or []:
        for found in found_list:
            number = next((i for i, r in enumerate(rules) if r["rule"] == found.rule.name), None)
            for region in found.regions if number is not None else []:
                for node in region.nodes:
                    node_rule.setdefault(node.name, number)
    tuners: list[dict] = []
    trainable = None
    if result is not None:
        summaries = manifest["summary"] if manifest else [vars(s) for s in result.summaries]
        for s in summaries:
            number = len(rules)
            rules.append(
                {
                    "rule": s["rule"],
                    "file": "",
                    "tuner": s["tuner"],
                    "position": s["position"],
                    "where": s.get("where", ""),
                    "pattern": "",
                    "regions": s["regions"],
                    "added": s["added_parameters"],
                    "trained": s["trained_parameters"],
                    "note": "",
                }
            )
            for index, scope in enumerate(s.get("scopes", [])):
                regions.append(
                    {"rule": number, "index": index, "scope": scope, "shapes": "", "added": None, "refused": ""}
                )
        numbers = {r["rule"]: i for i, r in enumerate(rules)}
        tuners = _tuners(gm, summaries)
        for tuner in tuners:
            tuner["rule_number"] = numbers.get(tuner["rule"], 0)
            for node_name, _ in tuner["writes"]:
                node_rule.setdefault(node_name, tuner["rule_number"])
        trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
        base = result.base_parameters or base
    status = {e["module"]: e for e in fold_entries or []}
    for tuner in tuners:
        if tuner["module"] in status:
            tuner["fold"] = status[tuner["module"]]["status"]
            tuner["fold_reason"] = status[tuner["module"]]["reason"]
    # the graph's ops by module
    ops: dict[str, list[tuple[str, str, int | None, str]]] = {}
    for node in gm.graph.nodes:
        info = _info(node)
        if info is None or node.op in ("placeholder", "output", "get_attr") or info.op_kind in _HIDDEN_KINDS:
            continue
        tag = node.meta.get(_TUNER_META)
        rule = node_rule.get(node.name)
        if tag is not None:  # a tuner's call and the sum it writes: its rule's colour
            rule = next((i for i, r in enumerate(rules) if r["rule"] == tag["rule"]), rule)
        detail = f"{node.name}: {info.op_name} {_shape(info.shape)}" + (f" ({node.target})" if tag else "")
        label = info.op_name if info.op_kind == "tuner" else info.op_kind  # a tuner by its class
        ops.setdefault(_owner(info.scope, modules), []).append((label, detail, rule, tag["rule"] if tag else ""))
    if trainable is None and match_reports:
        trainable = sum(r["added_parameters"] + r["trained_parameters"] for r in match_reports)
    return {
        "name": name,
        "kind": kind,
        "base_parameters": base,
        "trainable_parameters": trainable,
        "rule_files": [r["rules"] for r in match_reports or []]
        + (
            [r["path"] for r in manifest["rules"]]
            if manifest
            else [getattr(rs, "path", "") for rs in getattr(result, "rule_sets", []) or []]
        ),
        "modules": modules,
        "ops": ops,
        "rules": rules,
        "regions": regions,
        "tuners": tuners,
        "fold": fold_entries,
        "fold_difference": fold_difference,
        "history": history,
        "summary": summary,
    }


# -- rendering ----------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 24px 40px;color:#1d2125;background:#fff}
h1{font-size:20px;margin:16px 0 4px}h2{font-size:16px;margin:22px 0 6px;border-bottom:1px solid #ddd}
.meta{color:#555}.bar{position:sticky;top:0;background:#fff;padding:6px 0;z-index:2;border-bottom:1px solid #eee}
button{font:inherit;font-size:12px;margin-right:6px;padding:2px 8px}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;text-align:left;vertical-align:top}
th{background:#f2f4f6}tr:nth-child(even) td{background:#fafbfc}td.n,th.n{text-align:right}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.chip{display:inline-block;border-radius:9px;padding:0 7px;margin:1px 2px;font-size:12px;
 background:color-mix(in srgb,var(--c) 22%,white);border:1px solid var(--c)}
.sw{display:inline-block;width:11px;height:11px;border-radius:2px;background:var(--c);vertical-align:-1px}
details{margin-left:14px}details>summary{cursor:pointer;padding:1px 0}.cls{color:#6a737d}
.leaf{margin-left:28px;padding:1px 0}.num{color:#57606a;font-size:12px}
.ops{margin:2px 0 2px 30px}.o{display:inline-block;font:11px ui-monospace,monospace;padding:0 4px;margin:1px;
 border:1px solid #d0d7de;border-radius:3px;background:#f6f8fa;color:#444}
.o.r{background:color-mix(in srgb,var(--c) 30%,white);border-color:var(--c);color:#000}
.o.t{font-weight:bold;border-style:dashed}
.region,.tuner{margin:2px 0 2px 30px;font-size:12px}.tuner{border-left:4px dashed var(--c);padding-left:6px}
.region{border-left:4px solid var(--c);padding-left:6px}
.run{margin:2px 0 2px 28px;color:#57606a;font-style:italic}.note{color:#8a4b08}
.folded{color:#1a7f37}.kept{color:#9a6700}
svg text{font:11px system-ui,sans-serif;fill:#333}
"""

_SCRIPT = """
function setAll(o){document.querySelectorAll('details').forEach(function(d){d.open=o})}
document.addEventListener('DOMContentLoaded',function(){if(location.hash==='#expand'){setAll(true)}})
"""


def _colour(number: int) -> str:
    return f"hsl({(number * 137.5 + 210) % 360:.0f} 70% 45%)"


class _Budget:
    def __init__(self) -> None:
        self.modules = self.ops = self.opened = 0
        self.skipped_modules = self.skipped_ops = 0


def _subtree_facts(data: dict) -> tuple[dict, ...]:
    """Per module path: parameters in the subtree, Counter of rule regions in it, tuners in it, and a
    structural signature (for collapsing identical numbered siblings)."""
    modules = data["modules"]
    here_regions: dict[str, list[dict]] = {}
    for region in data["regions"]:
        here_regions.setdefault(_owner(region["scope"], modules), []).append(region)
    here_tuners: dict[str, list[dict]] = {}
    for tuner in data["tuners"]:
        scope = tuner["scope"] if tuner["scope"] is not None else (tuner["writes"][0][1] if tuner["writes"] else "")
        here_tuners.setdefault(_owner(scope, modules), []).append(tuner)
    params, counts, tuners, signature = {}, {}, {}, {}

    def visit(path: str) -> None:
        module = modules[path]
        total, count, tuned, children = module["params"], Counter(), 0, []
        for child in module["children"]:
            sub = f"{path}.{child}" if path else child
            visit(sub)
            total += params[sub]
            count += counts[sub]
            tuned += tuners[sub]
            children.append((child, signature[sub]))
        count.update(r["rule"] for r in here_regions.get(path, []))
        tuned += len(here_tuners.get(path, []))
        params[path], counts[path], tuners[path] = total, count, tuned
        signature[path] = hash(
            (
                module["cls"],
                module["params"],
                tuple((k, r, t) for k, _, r, t in data["ops"].get(path, [])),
                tuple(sorted((r["rule"], r["shapes"], r["added"] or 0) for r in here_regions.get(path, []))),
                tuple((t["rule"], t["cls"], t["parameters"], t.get("fold", "")) for t in here_tuners.get(path, [])),
                tuple(children),
            )
        )

    visit("")
    return params, counts, tuners, signature, here_regions, here_tuners


def _chips(count: Counter, data: dict) -> str:
    return "".join(
        f'<span class="chip" style="--c:{_colour(rule)}" data-rule="{_e(data["rules"][rule]["rule"])}" '
        f'data-count="{n}">{_e(data["rules"][rule]["rule"])} &times;{n}</span>'
        for rule, n in sorted(count.items())
    )


def _render_tree(data: dict, budget: _Budget) -> str:
    modules = data["modules"]
    params, counts, tuners, signature, here_regions, here_tuners = _subtree_facts(data)
    out: list[str] = []

    def op_chips(path: str) -> str:
        ops = data["ops"].get(path, [])
        if not ops:
            return ""
        if budget.ops + len(ops) > MAX_OPS:
            budget.skipped_ops += len(ops)
            return f'<span class="note">{len(ops)} ops not drawn (the page draws {MAX_OPS} at most)</span>'
        budget.ops += len(ops)
        chips = []
        for op_kind, detail, rule, tag in ops:
            cls = "o" + (" r" if rule is not None else "") + (" t" if tag else "")
            style = f' style="--c:{_colour(rule)}"' if rule is not None else ""
            chips.append(f'<span class="{cls}"{style} title="{_e(detail)}">{_e(op_kind)}</span>')
        return "".join(chips)

    def body(path: str) -> None:
        chips = op_chips(path)
        if chips:
            out.append(f'<div class="ops">{chips}</div>')
        for region in here_regions.get(path, []):
            rule = data["rules"][region["rule"]]
            extra = f" {_e(region['shapes'])}" if region["shapes"] else ""
            extra += f", +{region['added']:,} parameters" if region["added"] else ""
            extra += f' <span class="note">refused: {_e(region["refused"])}</span>' if region["refused"] else ""
            out.append(
                f'<div class="region" style="--c:{_colour(region["rule"])}"><span class="sw"></span> region '
                f"<b>{_e(rule['rule'])}</b> #{region['index']} ({_e(rule['tuner'])} at {_e(rule['position'])})"
                f"{extra}</div>"
            )
        for tuner in here_tuners.get(path, []):
            out.append(
                f'<div class="tuner" style="--c:{_colour(tuner["rule_number"])}">tuner <code>{_e(tuner["module"])}'
                f"</code> {_e(tuner['cls'])}, {tuner['parameters']:,} parameters: reads {_sites(tuner['reads'])}"
                f" &rarr; writes {_sites(tuner['writes'])}"
                + (
                    f' <span class="{_fold_class(tuner["fold"])}">[{_e(tuner["fold"])}]</span>'
                    if "fold" in tuner
                    else ""
                )
                + "</div>"
            )

    def visit(path: str, depth: int) -> None:
        module = modules[path]
        name = path.rpartition(".")[2] if path else data["name"]
        if budget.modules >= MAX_MODULES:
            budget.skipped_modules += 1
            return
        budget.modules += 1
        facts = (
            f'<b>{_e(name)}</b> <span class="cls">{_e(module["cls"])}</span> '
            f'<span class="num">{_count(params[path])} params</span> {_chips(counts[path], data)}'
            + (f' <span class="num">{tuners[path]} tuner(s)</span>' if tuners[path] else "")
        )
        if not (module["children"] or here_regions.get(path) or here_tuners.get(path)):
            out.append(f'<div class="leaf" data-path="{_e(path)}">{facts} {op_chips(path)}</div>')
            return
        opened = ""
        if depth < 2 or (counts[path] or tuners[path]) and budget.opened < MAX_OPENED:
            opened, budget.opened = " open", budget.opened + 1
        out.append(f'<details{opened} data-path="{_e(path)}"><summary>{facts}</summary>')
        body(path)
        children = module["children"]
        i = 0
        while i < len(children):
            sub = f"{path}.{children[i]}" if path else children[i]
            visit(sub, depth + 1)
            j = i + 1
            while j < len(children) and children[i].isdigit() and children[j].isdigit():
                other = f"{path}.{children[j]}" if path else children[j]
                if signature[other] != signature[sub]:
                    break
                j += 1
            if j - i > 1:
                names = _e(children[i + 1]) + (f" &hellip; {_e(children[j - 1])}" if j - i > 2 else "")
                each = _chips(counts[sub], data)
                out.append(
                    f'<div class="run" data-same="{j - i - 1}">{names}: {j - i - 1} more '
                    f"{_e(modules[sub]['cls'])}, identical to {_e(children[i])} (modules, ops, regions, "
                    f"tuners); each {_count(params[sub])} params {each}</div>"
                )
            i = j
        out.append("</details>")

    visit("", 0)
    return "".join(out)


def _sites(sites: list) -> str:
    return ", ".join(f"<code>{_e(node)}</code> ({_e(scope or 'model')})" for node, scope in sites) or "-"


def _fold_class(status: str) -> str:
    return "folded" if status in ("folded", "constant", "in place") else "kept"


def _table(headers: list[str], rows: list[list[str]], numeric: set[int], attrs: str = "") -> str:
    head = "".join(f"<th{' class=n' if i in numeric else ''}>{h}</th>" for i, h in enumerate(headers))
    shown = rows[:MAX_ROWS]
    body = "".join(
        "<tr>" + "".join(f"<td{' class=n' if i in numeric else ''}>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in shown
    )
    more = f'<p class="note">{len(rows) - MAX_ROWS} more rows not drawn</p>' if len(rows) > MAX_ROWS else ""
    return f"<table{attrs}><tr>{head}</tr>{body}</table>{more}"


def _parameter_table(data: dict) -> str:
    base = data["base_parameters"] or 0
    rows = []
    for number, rule in enumerate(data["rules"]):
        share = 100 * (rule["added"] + rule["trained"]) / base if base else 0.0
        rows.append(
            [
                f'<span class="sw" style="--c:{_colour(number)}"></span> {_e(rule["rule"])}',
                _e(rule["tuner"]),
                _e(rule["position"]),
                str(rule["regions"]),
                f"{rule['added']:,}",
                f"{rule['trained']:,}",
                f"{share:.3f}%",
                f'<span class="mono">{_e(rule["where"])}</span>'
                + (f'<br><span class="note">{_e(rule["note"])}</span>' if rule["note"] else ""),
            ]
        )
    trainable = data["trainable_parameters"]
    total = (
        f'<p id="totals" data-trainable="{trainable}" data-base="{base}"><b>trainable {trainable:,} parameters = '
        f"{100 * trainable / base if base else 0:.3f}% of the base model's {base:,}</b></p>"
        if trainable is not None
        else f'<p id="totals" data-base="{base}">base model: {base:,} parameters</p>'
    )
    headers = ["rule", "tuner", "position", "regions", "+ parameters", "trained existing", "% of base", "rule"]
    return total + _table(headers, rows, {3, 4, 5, 6}, ' id="rules"')


def _tuner_table(data: dict) -> str:
    folded = any("fold" in t for t in data["tuners"])
    rows = []
    for tuner in data["tuners"]:
        row = [
            f'<span class="sw" style="--c:{_colour(tuner["rule_number"])}"></span> <code>{_e(tuner["module"])}</code>',
            _e(tuner["rule"]),
            _e(tuner["cls"]),
            f"{tuner['parameters']:,}",
            _sites(tuner["reads"]),
            _sites(tuner["writes"]),
        ]
        if folded:
            status = tuner.get("fold", "")
            row.append(f'<span class="{_fold_class(status)}">{_e(status)}</span> {_e(tuner.get("fold_reason", ""))}')
        rows.append(row)
    total = sum({t["module"]: t["parameters"] for t in data["tuners"]}.values())  # a module called twice: once
    rows.append(["<b>total</b>", "", "", f"<b>{total:,}</b>", "", ""] + ([""] if folded else []))
    headers = ["tuner module", "rule", "class", "parameters", "reads", "writes (adds to)"] + (
        ["fold"] if folded else []
    )
    return _table(headers, rows, {3}, ' id="tuners"')


def _region_table(data: dict) -> str:
    rows = []
    for region in data["regions"]:
        rule = data["rules"][region["rule"]]
        rows.append(
            [
                f'<span class="sw" style="--c:{_colour(region["rule"])}"></span> {_e(rule["rule"])}',
                str(region["index"]),
                f"<code>{_e(region['scope'] or '(model)')}</code>",
                _e(region["shapes"]),
                f"{region['added']:,}" if region["added"] is not None else "",
                _e(region["refused"]),
            ]
        )
    if not any(region["shapes"] for region in data["regions"]):  # a tuned graph's regions: only their scopes
        return _table(["rule", "#", "scope"], [row[:3] for row in rows], {1}, ' id="regions"')
    return _table(["rule", "#", "scope", "in -> out", "+ parameters", "refused"], rows, {1, 4}, ' id="regions"')


def _fold_section(data: dict) -> str:
    entries = data["fold"]
    counts = Counter(e["status"] for e in entries)
    line = ", ".join(f"{n} {_e(status)}" for status, n in counts.items())
    if data["fold_difference"] is not None:
        line += f"; folded vs tuned outputs: max relative difference {data['fold_difference']:.2e}"
    tuned = {t["module"] for t in data["tuners"]}
    rest = [e for e in entries if e["module"] not in tuned]
    rows = [
        [_e(e["rule"]), _e(e["tuner"]), f"<code>{_e(e['module'])}</code>", _e(e["status"]), _e(e["reason"])]
        for e in rest
    ]
    table = _table(["rule", "tuner", "where", "status", "reason"], rows, set()) if rows else ""
    return f'<p id="fold-counts">{line}</p>' + table


def _polyline(points: list[tuple[float, float]], x, y, colour: str) -> str:
    coords = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in points)
    dots = "".join(f'<circle cx="{x(a):.1f}" cy="{y(b):.1f}" r="2.5" fill="{colour}"/>' for a, b in points)
    return f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>{dots}'


def _curve(history: list[dict], metric: str, title: str) -> str:
    """One SVG panel: train and validation ``metric`` per epoch."""
    width, height, left, right, top, bottom = 420, 230, 46, 12, 22, 30
    series = []
    for key, colour, label in (("train", "#0969da", "train"), ("val", "#cf222e", "validation")):
        points = [
            (row["epoch"], row[f"{key}_{metric}"])
            for row in history
            if isinstance(row.get(f"{key}_{metric}"), int | float) and math.isfinite(row[f"{key}_{metric}"])
        ]
        if points:
            series.append((points, colour, label))
    if not series:
        return ""
    xs = [p[0] for s in series for p in s[0]]
    ys = [p[1] for s in series for p in s[0]]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = (0.0, 1.0) if metric == "accuracy" else (min(0.0, min(ys)), max(ys) * 1.05 or 1.0)

    def x(v):
        return left + (v - x0) / (x1 - x0) * (width - left - right)

    def y(v):
        return top + (1 - (v - y0) / (y1 - y0)) * (height - top - bottom)

    grid = "".join(
        f'<line x1="{left}" x2="{width - right}" y1="{y(y0 + f * (y1 - y0)):.1f}" y2="{y(y0 + f * (y1 - y0)):.1f}" '
        f'stroke="#eee"/><text x="{left - 4}" y="{y(y0 + f * (y1 - y0)) + 4:.1f}" text-anchor="end">'
        f"{y0 + f * (y1 - y0):.2f}</text>"
        for f in (0, 0.25, 0.5, 0.75, 1)
    )
    ticks = sorted(set(xs))
    step = max(1, len(ticks) // 10)
    xlabels = "".join(
        f'<text x="{x(t):.1f}" y="{height - bottom + 14}" text-anchor="middle">{t}</text>' for t in ticks[::step]
    )
    lines = "".join(_polyline(p, x, y, c) for p, c, _ in series)
    legend = "".join(
        f'<rect x="{width - 120}" y="{top + 4 + 14 * i}" width="10" height="3" fill="{c}"/>'
        f'<text x="{width - 106}" y="{top + 9 + 14 * i}">{label}</text>'
        for i, (_, c, label) in enumerate(series)
    )
    return (
        f'<svg class="curve" data-metric="{metric}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{title}">'
        f'<text x="{left}" y="14" font-weight="bold">{title}</text>{grid}{xlabels}'
        f'<text x="{(width + left) / 2:.0f}" y="{height - 2}" text-anchor="middle">epoch</text>{lines}{legend}</svg>'
    )


def _training_section(data: dict) -> str:
    history = data["history"] or []
    summary = data["summary"] or {}
    figures = _curve(history, "loss", "loss") + _curve(history, "accuracy", "top-1 accuracy")
    facts = []
    for key, label, form in (
        ("best_val_accuracy", "best validation accuracy", "{:.1%}"),
        ("best_epoch", "best epoch", "{}"),
        ("last_val_accuracy", "last validation accuracy", "{:.1%}"),
        ("test_accuracy", "test accuracy", "{:.1%}"),
        ("epochs", "epochs", "{}"),
        ("wall_seconds", "wall seconds", "{:.1f}"),
        ("device", "device", "{}"),
    ):
        if isinstance(summary.get(key), int | float | str) and summary.get(key) is not None:
            facts.append(f"{label}: <b>{_e(form.format(summary[key]))}</b>")
    return f'<div id="curves">{figures}</div><p>{"; ".join(facts)}</p>'


def render(data: dict) -> str:
    import utune_fx

    budget = _Budget()
    tree = _render_tree(data, budget)
    sections = [
        f"<h1>utune_fx {_e(data['kind'])} report: {_e(data['name'])}</h1>",
        '<p class="meta">'
        + (
            f"rules: {', '.join(f'<code>{_e(p)}</code>' for p in data['rule_files'] if p)}; "
            if data["rule_files"]
            else ""
        )
        + f"{data['base_parameters']:,} base parameters; utune_fx {_e(utune_fx.__version__)}</p>",
        '<div class="bar"><button type="button" onclick="setAll(true)">expand all</button>'
        '<button type="button" onclick="setAll(false)">collapse all</button> '
        + "".join(
            f'<span class="chip legend" style="--c:{_colour(i)}" data-rule="{_e(r["rule"])}" '
            f'data-regions="{r["regions"]}">{_e(r["rule"])}: {r["regions"]} region(s), {_e(r["tuner"])} at '
            f"{_e(r['position'])}</span>"
            for i, r in enumerate(data["rules"])
        )
        + "</div>",
        '<h2 id="parameters">Parameters</h2>' + _parameter_table(data),
    ]
    if data["history"]:
        sections.append('<h2 id="training">Training</h2>' + _training_section(data))
    if data["fold"] is not None:
        sections.append('<h2 id="folding">Fold</h2>' + _fold_section(data))
    sections.append(
        '<h2 id="graph">Model graph by module</h2><p class="meta">modules with their graph ops (hover an op for '
        "its node, shape), coloured by the rule whose region holds it; regions and tuners under the module they "
        "sit in; identical numbered siblings drawn once</p>" + f'<div class="tree">{tree}</div>'
    )
    if data["tuners"]:
        sections.append('<h2 id="tuner-list">Tuners: where each reads and writes</h2>' + _tuner_table(data))
    if data["regions"]:
        sections.append('<h2 id="region-list">Regions</h2>' + _region_table(data))
    limits = []
    if budget.skipped_modules:
        limits.append(f"{budget.skipped_modules} modules past the first {MAX_MODULES} not drawn")
    if budget.skipped_ops:
        limits.append(f"{budget.skipped_ops} ops past the first {MAX_OPS} not drawn")
    sections.append(
        '<p class="meta" id="limits">Bounded page: at most '
        f"{MAX_MODULES} modules, {MAX_OPS} ops and {MAX_ROWS} rows per table are drawn"
        + (f"; {'; '.join(limits)}" if limits else "; everything is drawn")
        + ".</p>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>utune_fx {_e(data['kind'])}: {_e(data['name'])}</title><style>{_CSS}</style>"
        f"<script>{_SCRIPT}</script></head><body>" + "\n".join(sections) + "</body></html>\n"
    )


def write_report(path: str | Path, data: dict) -> Path:
    path = Path(path)
    page = render(data)
    try:
        write_text(path, page)
    except OSError as error:
        raise UtuneError(f"{path}: cannot write the report ({first_line(error)}); write it elsewhere") from None
    return path
