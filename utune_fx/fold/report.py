"""The table ``cli.py fold`` prints: each tuner folded, made constant, in place, or kept (why)."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

from utune_fx.fold import FoldResult

_STYLE = {"folded": "green", "constant": "green", "in place": "green", "kept": "yellow"}


def render_fold(folded: FoldResult, difference: float, tuned_parameters: int, console: Console) -> None:
    table = Table(box=None, pad_edge=False, title="Fold", title_justify="left")
    for column in ("rule", "tuner", "module", "status", "reason"):
        table.add_column(column, overflow="fold")
    for entry in folded.entries:
        style = _STYLE.get(entry.status, "")
        table.add_row(entry.rule, entry.tuner, entry.module, f"[{style}]{entry.status}[/]", entry.reason)
    console.print(table)
    counts = Counter(entry.status for entry in folded.entries)
    parameters = sum(t.numel() for t in folded.module.state_dict().values())
    console.print(", ".join(f"{n} {status}" for status, n in counts.items()) + "; folded vs tuned outputs: max "
                  f"relative difference {difference:.2e}; {tuned_parameters:,} -> {parameters:,} tensor elements")
