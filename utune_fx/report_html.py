"""One self-contained HTML file that shows what utune_fx did to a model (``--report FILE.html``).

    collect(gm, model, ...)  ->  dict      utune_fx/report_data.py: the page's data
    render(data)             ->  str       HTML: <details> per module (utune_fx/report_tree.py; works without
                                           JavaScript; a few lines of inline script add "expand all"), inline
                                           CSS, the parameter, tuner, region and fold tables, SVG curves
    write_report(path, data)               through a temporary name (utune_fx/atomic.py)

``match`` and ``rewrite`` write it with ``--report FILE.html``, ``train`` as OUT/report.html, ``fold`` as
OUT/report.html of the folded artifact. Nothing in the file is fetched: no URL, no font, no script from
elsewhere. Every name from the model, the rule file or the artifact is HTML-escaped.

Size stays bounded on deep models: identical numbered siblings are drawn once, and past MAX_MODULES modules,
MAX_OPS op chips (utune_fx/report_tree.py) or MAX_ROWS table rows the rest is counted, not drawn, and the page
says so.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from utune_fx.atomic import write_text
from utune_fx.errors import UtuneError, first_line
from utune_fx.report_tree import MAX_MODULES, MAX_OPS, Budget, esc, fold_class, render_tree, rule_colour, site_list

MAX_ROWS = 2000  # rows per table

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
                f'<span class="sw" style="--c:{rule_colour(number)}"></span> {esc(rule["rule"])}',
                esc(rule["tuner"]),
                esc(rule["position"]),
                str(rule["regions"]),
                f"{rule['added']:,}",
                f"{rule['trained']:,}",
                f"{share:.3f}%",
                f'<span class="mono">{esc(rule["where"])}</span>'
                + (f'<br><span class="note">{esc(rule["note"])}</span>' if rule["note"] else ""),
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
            f'<span class="sw" style="--c:{rule_colour(tuner["rule_number"])}"></span> <code>{esc(tuner["module"])}</code>',
            esc(tuner["rule"]),
            esc(tuner["cls"]),
            f"{tuner['parameters']:,}",
            site_list(tuner["reads"]),
            site_list(tuner["writes"]),
        ]
        if folded:
            status = tuner.get("fold", "")
            row.append(f'<span class="{fold_class(status)}">{esc(status)}</span> {esc(tuner.get("fold_reason", ""))}')
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
                f'<span class="sw" style="--c:{rule_colour(region["rule"])}"></span> {esc(rule["rule"])}',
                str(region["index"]),
                f"<code>{esc(region['scope'] or '(model)')}</code>",
                esc(region["shapes"]),
                f"{region['added']:,}" if region["added"] is not None else "",
                esc(region["refused"]),
            ]
        )
    if not any(region["shapes"] for region in data["regions"]):  # a tuned graph's regions: only their scopes
        return _table(["rule", "#", "scope"], [row[:3] for row in rows], {1}, ' id="regions"')
    return _table(["rule", "#", "scope", "in -> out", "+ parameters", "refused"], rows, {1, 4}, ' id="regions"')


def _fold_section(data: dict) -> str:
    entries = data["fold"]
    counts = Counter(e["status"] for e in entries)
    line = ", ".join(f"{n} {esc(status)}" for status, n in counts.items())
    if data["fold_difference"] is not None:
        line += f"; folded vs tuned outputs: max relative difference {data['fold_difference']:.2e}"
    tuned = {t["module"] for t in data["tuners"]}
    rest = [e for e in entries if e["module"] not in tuned]
    rows = [
        [esc(e["rule"]), esc(e["tuner"]), f"<code>{esc(e['module'])}</code>", esc(e["status"]), esc(e["reason"])]
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
            facts.append(f"{label}: <b>{esc(form.format(summary[key]))}</b>")
    return f'<div id="curves">{figures}</div><p>{"; ".join(facts)}</p>'


def render(data: dict) -> str:
    import utune_fx

    budget = Budget()
    tree = render_tree(data, budget)
    sections = [
        f"<h1>utune_fx {esc(data['kind'])} report: {esc(data['name'])}</h1>",
        '<p class="meta">'
        + (
            f"rules: {', '.join(f'<code>{esc(p)}</code>' for p in data['rule_files'] if p)}; "
            if data["rule_files"]
            else ""
        )
        + f"{data['base_parameters']:,} base parameters; utune_fx {esc(utune_fx.__version__)}</p>",
        '<div class="bar"><button type="button" onclick="setAll(true)">expand all</button>'
        '<button type="button" onclick="setAll(false)">collapse all</button> '
        + "".join(
            f'<span class="chip legend" style="--c:{rule_colour(i)}" data-rule="{esc(r["rule"])}" '
            f'data-regions="{r["regions"]}">{esc(r["rule"])}: {r["regions"]} region(s), {esc(r["tuner"])} at '
            f"{esc(r['position'])}</span>"
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
        f"<title>utune_fx {esc(data['kind'])}: {esc(data['name'])}</title><style>{_CSS}</style>"
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
