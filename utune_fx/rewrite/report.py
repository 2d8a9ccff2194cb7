"""The summary table ``cli.py rewrite`` prints: per rule, regions, parameters
added, existing parameters trained, and the trainable share of the base model.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from utune_fx.rewrite import RewriteResult


def render_rewrite(result: RewriteResult, name: str, console: Console) -> None:
    table = Table(
        title=f"Tuned {name} ({result.base_parameters:,} base parameters)",
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    for column in ("rule", "tuner", "position", "regions", "+ parameters", "trained existing", "% of base"):
        table.add_column(column, justify="left" if column in ("rule", "tuner", "position") else "right")
    for s in result.summaries:
        share = 100 * (s.added_parameters + s.trained_parameters) / result.base_parameters
        table.add_row(
            s.rule,
            s.tuner,
            s.position,
            str(s.regions),
            f"{s.added_parameters:,}",
            f"{s.trained_parameters:,}",
            f"{share:.3f}%",
        )
    console.print(table)
    adapted = sum(s.regions for s in result.summaries if s.position != "none")
    console.print(
        f"{adapted} adapted operation(s); trainable {result.trainable_parameters:,} parameters = "
        f"{100 * result.trainable_share:.2f}% of the base model; everything else frozen"
    )
