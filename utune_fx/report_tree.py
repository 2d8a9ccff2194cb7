"""The model tree of the HTML report (utune_fx/report_html.py): the modules of collect()'s data as nested
<details>, each with its graph ops as chips coloured by rule, and the regions and tuners that sit in it.

Consecutive numbered siblings that are identical (same classes, parameters, ops, regions, tuners and fold
statuses, e.g. blocks.1..95 of a ViT) are one line under the first of them, drawn in full; past MAX_MODULES
modules or MAX_OPS op chips the rest is counted in a Budget, not drawn. The small helpers the page shares
(escaping, rule colours, node lists, fold classes) live here too.
"""

from __future__ import annotations

import html
from collections import Counter
from typing import Any

from utune_fx.report_data import owner

MAX_MODULES = 3000  # module entries drawn in the tree
MAX_OPS = 6000  # op chips drawn in the tree
MAX_OPENED = 40  # modules holding regions or tuners shown open (the first two levels always are)


def esc(value: Any) -> str:
    """``value`` as HTML text or attribute, escaped."""
    return html.escape(str(value), quote=True)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def rule_colour(number: int) -> str:
    return f"hsl({(number * 137.5 + 210) % 360:.0f} 70% 45%)"


def site_list(sites: list) -> str:
    return ", ".join(f"<code>{esc(node)}</code> ({esc(scope or 'model')})" for node, scope in sites) or "-"


def fold_class(status: str) -> str:
    return "folded" if status in ("folded", "constant", "in place") else "kept"


class Budget:
    """What the tree drew and left out, for the page's limits line."""

    def __init__(self) -> None:
        self.modules = self.ops = self.opened = 0
        self.skipped_modules = self.skipped_ops = 0


def _subtree_facts(data: dict) -> tuple[dict, ...]:
    """Per module path: parameters in the subtree, Counter of rule regions in it, tuners in it, and a
    structural signature (for collapsing identical numbered siblings)."""
    modules = data["modules"]
    here_regions: dict[str, list[dict]] = {}
    for region in data["regions"]:
        here_regions.setdefault(owner(region["scope"], modules), []).append(region)
    here_tuners: dict[str, list[dict]] = {}
    for tuner in data["tuners"]:
        scope = tuner["scope"] if tuner["scope"] is not None else (tuner["writes"][0][1] if tuner["writes"] else "")
        here_tuners.setdefault(owner(scope, modules), []).append(tuner)
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
        f'<span class="chip" style="--c:{rule_colour(rule)}" data-rule="{esc(data["rules"][rule]["rule"])}" '
        f'data-count="{n}">{esc(data["rules"][rule]["rule"])} &times;{n}</span>'
        for rule, n in sorted(count.items())
    )


def render_tree(data: dict, budget: Budget) -> str:
    """The module tree of collect()'s data as nested <details>, counting in ``budget`` what it leaves out."""
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
            style = f' style="--c:{rule_colour(rule)}"' if rule is not None else ""
            chips.append(f'<span class="{cls}"{style} title="{esc(detail)}">{esc(op_kind)}</span>')
        return "".join(chips)

    def body(path: str) -> None:
        chips = op_chips(path)
        if chips:
            out.append(f'<div class="ops">{chips}</div>')
        for region in here_regions.get(path, []):
            rule = data["rules"][region["rule"]]
            extra = f" {esc(region['shapes'])}" if region["shapes"] else ""
            extra += f", +{region['added']:,} parameters" if region["added"] else ""
            extra += f' <span class="note">refused: {esc(region["refused"])}</span>' if region["refused"] else ""
            out.append(
                f'<div class="region" style="--c:{rule_colour(region["rule"])}"><span class="sw"></span> region '
                f"<b>{esc(rule['rule'])}</b> #{region['index']} ({esc(rule['tuner'])} at {esc(rule['position'])})"
                f"{extra}</div>"
            )
        for tuner in here_tuners.get(path, []):
            out.append(
                f'<div class="tuner" style="--c:{rule_colour(tuner["rule_number"])}">tuner <code>{esc(tuner["module"])}'
                f"</code> {esc(tuner['cls'])}, {tuner['parameters']:,} parameters: reads {site_list(tuner['reads'])}"
                f" &rarr; writes {site_list(tuner['writes'])}"
                + (
                    f' <span class="{fold_class(tuner["fold"])}">[{esc(tuner["fold"])}]</span>'
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
            f'<b>{esc(name)}</b> <span class="cls">{esc(module["cls"])}</span> '
            f'<span class="num">{_count(params[path])} params</span> {_chips(counts[path], data)}'
            + (f' <span class="num">{tuners[path]} tuner(s)</span>' if tuners[path] else "")
        )
        if not (module["children"] or here_regions.get(path) or here_tuners.get(path)):
            out.append(f'<div class="leaf" data-path="{esc(path)}">{facts} {op_chips(path)}</div>')
            return
        opened = ""
        if depth < 2 or (counts[path] or tuners[path]) and budget.opened < MAX_OPENED:
            opened, budget.opened = " open", budget.opened + 1
        out.append(f'<details{opened} data-path="{esc(path)}"><summary>{facts}</summary>')
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
                names = esc(children[i + 1]) + (f" &hellip; {esc(children[j - 1])}" if j - i > 2 else "")
                each = _chips(counts[sub], data)
                out.append(
                    f'<div class="run" data-same="{j - i - 1}">{names}: {j - i - 1} more '
                    f"{esc(modules[sub]['cls'])}, identical to {esc(children[i])} (modules, ops, regions, "
                    f"tuners); each {_count(params[sub])} params {each}</div>"
                )
            i = j
        out.append("</details>")

    visit("", 0)
    return "".join(out)
