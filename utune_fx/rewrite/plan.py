"""The dry run ``match`` and ``rewrite`` share: the site checks, the size bounds and the memory estimate.

    match_report(gm, model, rules, name, check=site_refusal)   # every region: size, cost, refusal
    dry_run_refusal([report, ...], bytes_per_parameter(model))  # the first refusal, or the memory one

``cli.py match`` prints the report and, when a region is refused, the refusal as its error line
(exit 2); ``rewrite`` runs the same report on the frozen graph before it inserts anything and raises
the same line. So what ``match`` approves, ``rewrite`` does, and a size the machine cannot hold is
refused with its figure before anything is allocated.

Nothing here changes the graph for good: the checks are the rewriter's own (passes.region_site and
friends); a transposed key a written-out attention needs is inserted by them and taken out again.
"""

from __future__ import annotations

from torch import fx, nn

from utune_fx.errors import UtuneError
from utune_fx.match import MatchContext, Region, RuleMatch
from utune_fx.match.sizes import region_tokens, size_refusal
from utune_fx.memory import available_memory, human_bytes
from utune_fx.rewrite.attention_sites import (
    _attention_cores,
    _attentions,
    _stream_input,
    attention_site,
    deep_prompt_stream,
    fail,
)
from utune_fx.rewrite.bypass import ladder
from utune_fx.rewrite.passes import head_layer, region_site, trained_by_rule
from utune_fx.tuners import RegionSize

# The tuners' parameters may take at most this share of the memory available when ``rewrite`` runs:
# training needs about four times as much again (gradients, two optimiser moments) plus activations.
MEMORY_SHARE = 0.5


def site_refusal(found: RuleMatch, region: Region, ctx: MatchContext, size: RegionSize) -> str | None:
    """The one line ``rewrite`` would refuse this region with, or None."""
    graph = ctx.gm.graph
    before = set(graph.nodes) if found.rule.position in ("prefix", "prompt") else None
    try:
        _check_site(found, region, ctx, size)
    except UtuneError as error:
        return str(error)
    finally:
        if before is not None:
            _drop_new_nodes(graph, before)
    return None


def _drop_new_nodes(graph: fx.Graph, before: set[fx.Node]) -> None:
    for node in reversed(list(graph.nodes)):
        if node not in before and not node.users:
            graph.erase_node(node)


def _check_site(found: RuleMatch, region: Region, ctx: MatchContext, size: RegionSize) -> None:
    rule = found.rule
    if region is found.regions[0]:
        trained_by_rule(ctx.gm, found, ctx)  # its train globs name parameters
    if rule.position == "none":
        if getattr(rule.config, "num_classes", None):
            head_layer(found, region, ctx)
    elif rule.position == "prompt":
        _check_prompt_site(found, region, ctx)
    elif rule.position == "bypass":
        if region is found.regions[0]:  # the ladder is one chain: its first region checks every stem
            ladder(found, ctx)
    else:
        region_site(found, region, ctx)
    refusal = size_refusal(rule.config, size, region_tokens(region))
    if refusal is not None:
        raise fail(found, region, f"{rule.tuner}: {refusal}")


def _check_prompt_site(found: RuleMatch, region: Region, ctx: MatchContext) -> None:
    """What insert_prompts asks of a block before it inserts anything."""
    calls = _attentions(found, region, ctx)
    if found.rule.config.deep:
        deep_prompt_stream(found, region, calls)
    else:
        _stream_input(found, region)
        _attention_cores(found, region, calls)
    for call in calls:
        attention_site(found, region, call)


def bytes_per_parameter(model: nn.Module) -> int:
    """Bytes of one tuner parameter: tuners take the dtype of the model's floating weights."""
    floating = next((p for p in model.parameters() if p.is_floating_point()), None)
    return floating.element_size() if floating is not None else 4  # float32


def memory_refusal(reports: list[dict], bytes_each: int) -> str | None:
    """Refuses tuners whose parameters would take more than MEMORY_SHARE of the available memory."""
    added = sum(report["added_parameters"] for report in reports)
    need, available = added * bytes_each, available_memory()
    if available is None or need <= MEMORY_SHARE * available:
        return None
    largest = max((entry for report in reports for entry in report["results"]), key=lambda e: e["added_parameters"])
    return (
        f"the tuners would add {added:,} parameters = {human_bytes(need)} ({bytes_each} bytes each), more than "
        f"{MEMORY_SHARE:.0%} of the {human_bytes(available)} of memory available; rule '{largest['rule']}' "
        f"({largest['where']}) adds {largest['added_parameters']:,}: lower its sizes (hidden, rank, length, "
        "num_classes) or tune fewer regions"
    )


def dry_run_refusal(reports: list[dict], bytes_each: int) -> str | None:
    """The line both ``match`` and ``rewrite`` fail with: the first refused region, else the memory estimate."""
    for report in reports:
        if report["refusals"]:
            return report["refusals"][0]
    return memory_refusal(reports, bytes_each)
