"""The table ``cli.py fold`` prints: tuners folded, made constant, in place, or kept (why).

Tuners of one rule with the same outcome share a row, their modules and
layers compressed (``utune.lora.{0..23}`` merged into ``blocks.{0..11}.attn.qkv``);
fold.json and ``--json`` keep one entry per tuner.
"""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

from utune_fx.fold import FOLDED, FoldResult
from utune_fx.inspection import compress_scopes
from utune_fx.tied import one_copy

_STYLE = {"folded": "green", "constant": "green", "in place": "green", "kept": "yellow"}
_MERGED = "merged into "


def _rows(folded: FoldResult) -> list[tuple[str, str, int, str, str, str]]:
    groups: dict[tuple, list] = {}
    for entry in folded.entries:
        merged = entry.status == FOLDED and entry.reason.startswith(_MERGED)
        key = (entry.rule, entry.tuner, entry.status, _MERGED if merged else entry.reason)
        groups.setdefault(key, []).append(entry)
    rows = []
    for (rule, tuner, status, reason), entries in groups.items():
        if reason == _MERGED:
            reason += ", ".join(compress_scopes([e.reason[len(_MERGED) :] for e in entries]))
        modules = ", ".join(compress_scopes([e.module for e in entries]))
        rows.append((rule, tuner, len(entries), modules, status, reason))
    return rows


def render_fold(folded: FoldResult, difference: float, tuned_parameters: int, console: Console) -> None:
    table = Table(box=None, pad_edge=False, title="Fold", title_justify="left")
    for column in ("rule", "tuner", "n", "modules", "status", "reason"):
        table.add_column(column, overflow="fold", justify="right" if column == "n" else "left")
    for rule, tuner, count, modules, status, reason in _rows(folded):
        table.add_row(rule, tuner, str(count), modules, f"[{_STYLE.get(status, '')}]{status}[/]", reason)
    console.print(table)
    counts = Counter(entry.status for entry in folded.entries)
    tensors, _ = one_copy(folded.module.state_dict(), folded.module)  # a tied tensor counts once
    parameters = sum(t.numel() for t in tensors.values())
    console.print(
        ", ".join(f"{n} {status}" for status, n in counts.items()) + "; folded vs tuned outputs: max "
        f"relative difference {difference:.2e}; {tuned_parameters:,} -> {parameters:,} tensor elements",
        soft_wrap=True,
    )
