"""The summary ``cli.py rewrite`` prints: per rule, the rule file and line that placed its tuners,
regions, parameters added, existing parameters trained, the trainable share of the base model;
then where each rule's tuners sit, tied parameters a rule trains, and rules that stood by.

    rule        tuner  position          regions  + parameters  ...  rule file
    lora        lora   reparameterised         4         6,144  ...  rules/lora.yaml:28:5
    classifier  head   none                    1             0  ...  rules/lora.yaml:40:5
    lora places utune.lora.{0..3} at h.{0,1}.attn.{c_attn,c_proj}
    classifier trains lm_head.weight, which is tied to transformer.wte.weight (one tensor): it trains them all
    rule lora_plain (rules/lora.yaml:33:5): not needed, a fallback for rule 'lora', which matched 4 region(s)
    ...; everything else frozen (the tied names above train too)
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from torch import nn

from utune_fx.inspection import compress_scopes
from utune_fx.match.rules import tuner_module_name
from utune_fx.rewrite import RewriteResult, RuleSummary
from utune_fx.trace import trace_report


def placement_line(summary: RuleSummary, module: nn.Module) -> str:
    """'lora places utune.lora.{0..3} at h.{0,1}.attn.c_attn' (modules and scopes compressed)."""
    scopes = ", ".join(compress_scopes(summary.scopes)) or "the model"
    if summary.position == "none":
        return f"{summary.rule} trains the {summary.tuner} parameters at {scopes}"
    prefix = f"utune.{tuner_module_name(summary.rule)}"
    try:
        modules = [f"{prefix}.{child}" for child, _ in module.get_submodule(prefix).named_children()]
    except AttributeError:  # a rule whose regions took no module
        modules = []
    return f"{summary.rule} places {', '.join(compress_scopes(modules)) or 'no module'} at {scopes}"


def tied_lines(summary: RuleSummary) -> list[str]:
    return [
        f"{summary.rule} trains {names[0]}, which is tied to {', '.join(names[1:])} (one tensor): it trains them all"
        for names in summary.tied
    ]


def render_rewrite(result: RewriteResult, name: str, console: Console) -> None:
    table = Table(
        title=f"Tuned {name} ({result.base_parameters:,} base parameters)",
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    columns = ("rule", "tuner", "position", "regions", "+ parameters", "trained existing", "% of base", "rule file")
    for column in columns:
        table.add_column(column, justify="right" if column in columns[3:7] else "left", overflow="fold")
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
            s.where,
        )
    console.print(table)
    for s in result.summaries:
        console.print(placement_line(s, result.module), soft_wrap=True)
    tied = [line for s in result.summaries for line in tied_lines(s)]
    for line in tied:
        console.print(line, soft_wrap=True)
    for rule, where, why in result.standby:
        console.print(f"rule {rule} ({where}): {why}", soft_wrap=True)
    for setting in trace_report(result.module).settings:
        console.print(f"traced with {setting}", soft_wrap=True)
    if trace_report(result.module).sequence:
        console.print(trace_report(result.module).sequence.describe(), soft_wrap=True)
    adapted = sum(s.regions for s in result.summaries if s.position != "none")
    console.print(
        f"{adapted} adapted operation(s); trainable {result.trainable_parameters:,} parameters = "
        f"{100 * result.trainable_share:.2f}% of the base model; everything else frozen"
        + (" (the tied names above train too)" if tied else "")
    )
