"""The sweep's report: per-stage pass rates, failures grouped by cause, one row per model.

    coverage_report(records) -> {"pass_rates": {"trace": [190, 191], ...}, "causes": [...], "rows": [...]}
    render_markdown(report, title) -> the text of docs/coverage.md

Models built on the meta device (above 300M parameters) stop after rewrite by design; they are
listed in their own column and left out of the denominators of the later stages, never counted
as passes.
"""

from __future__ import annotations

import re
from collections import Counter

from utune_fx.zoo.stages import META_STAGES, STAGES
from utune_fx.zoo.truth import COUNTS


def _reached(record: dict, stage: str) -> bool:
    last = record.get("last_stage")
    return last is not None and STAGES.index(last) >= STAGES.index(stage)


def _cause(record: dict) -> str:
    error = record["error"]
    message = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", error["message"])  # sizes and numbers vary per model
    return f"{error['stage']}: {error['class']}: {message[:160]}"


def coverage_report(records: dict[str, dict]) -> dict:
    rows = list(records.values())
    rates = {}
    for stage in STAGES:
        eligible = [r for r in rows if stage in META_STAGES or not r.get("meta")]
        rates[stage] = [sum(_reached(r, stage) for r in eligible), len(eligible)]
    causes = Counter(_cause(r) for r in rows if r.get("error"))
    examples = {}
    for r in rows:
        if r.get("error"):
            examples.setdefault(_cause(r), []).append(r["model"])
    found = [(r["model"], r.get("found", {})) for r in rows]
    return {
        "pass_rates": rates,
        "models": len(rows),
        "meta": sorted(r["model"] for r in rows if r.get("meta")),
        "attention": sorted(name for name, f in found if f.get("mha") and f.get("ffn")),
        "attention_without_ffn": sorted(name for name, f in found if f.get("mha") and not f.get("ffn")),
        "causes": [{"cause": cause, "count": n, "models": examples[cause]} for cause, n in causes.most_common()],
        "rows": rows,
    }


def _counts(counts: dict | None) -> str:
    return "/".join(str(counts.get(c, 0)) for c in COUNTS) if counts else ""


def _row(record: dict) -> str:
    found = record.get("found", {})
    folded = record.get("folded", {})
    error = record.get("error")
    truth = record.get("truth")
    if truth is None:
        tuners = [
            f"{found.get('mha', 0)}/{found.get('ffn', 0)}/{sum(n for r, n in found.items() if r.startswith('lora'))}"
        ]
    else:  # expected and found self/cross/ffn, LoRA on attention projections/elsewhere
        placed = truth.get("found") or {}
        lora = f"{placed['lora_on_projections']}/{placed['lora_elsewhere']}" if placed else ""
        tuners = [_counts(truth["expected"]), _counts(placed), lora]
    cells = [
        record["model"],
        f"{record.get('parameters', 0) / 1e6:.1f}",
        "meta" if record.get("meta") else "",
        *tuners,
        record.get("last_stage") or "-",
        f"{folded.get('folded', 0)}/{folded.get('kept', 0)}" if folded else "",
        f"{record['parity']:.0e}" if "parity" in record else "",
        f"{record.get('seconds', 0):.0f}",
        f"{error['class']}: {error['message'][:120]}".replace("|", "\\|") if error else "",
    ]
    return "| " + " | ".join(cells) + " |"


def render_markdown(report: dict, title: str, preamble: str) -> str:
    lines = [
        f"# {title}",
        "",
        preamble,
        "",
        "## Pass rate per stage",
        "",
        "| stage | passed | of | rate |",
        "|---|---:|---:|---:|",
    ]
    for stage, (passed, total) in report["pass_rates"].items():
        lines.append(f"| {stage} | {passed} | {total} | {100 * passed / max(total, 1):.1f}% |")
    meta = report["meta"]
    lines += [
        "",
        f"Built on the meta device (above 300M parameters; trace, match and rewrite only): "
        f"{', '.join(meta) if meta else 'none'}.",
        "",
        "## Failures by cause",
        "",
    ]
    if not report["causes"]:
        lines.append("None.")
    for cause in report["causes"]:
        models = ", ".join(cause["models"][:6]) + (", ..." if len(cause["models"]) > 6 else "")
        lines.append(f"- **{cause['count']}** {cause['cause']} ({models})")
    with_ffn, without = report.get("attention", []), report.get("attention_without_ffn", [])
    lines += [
        "",
        "## What the dual U-Tuner finds",
        "",
        f"Attention and FFN: {len(with_ffn)} models. Attention, no FFN found ({len(without)}; "
        "bottleneck attention has none, the others are listed under what is left): "
        f"{', '.join(without) if without else 'none'}. The others have no attention: "
        "LoRA tunes their block layers, or every layer where they have no residual blocks.",
    ]
    truth = any("truth" in record for record in report["rows"])
    found = (
        "expected self/cross/ffn | found self/cross/ffn | LoRA on projections/elsewhere"
        if truth
        else "mha/ffn/lora found"
    )
    lines += [
        "",
        "## Models",
        "",
        f"| model | params (M) | device | {found} | last stage | folded/kept | ORT max abs error | s | error |",
        "|---|---:|---|" + "---|" * (3 if truth else 1) + "---|---|---:|---:|---|",
    ]
    lines += [_row(record) for record in sorted(report["rows"], key=lambda r: r["model"])]
    return "\n".join(lines) + "\n"
