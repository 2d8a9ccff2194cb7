"""The data of the HTML report (utune_fx/report_html.py draws it): what utune_fx did to a model, as a dict.

    collect(gm, model, ...)  ->  dict      the module tree with each module's graph ops, the matched regions
                                           (by rule), the tuners with the nodes they read and write, the rule
                                           and parameter table, fold statuses, training history

From ``match``: its match reports and the RuleMatch lists they came from; from ``rewrite``, ``train`` and
``fold``: the RewriteResult (tuned graph, summaries), with the manifest of the artifact it was loaded from, fold
entries, and the run directory's history and summary (utune_fx/cli_train.py, utune_fx/cli_deploy.py read them).
Nothing here writes HTML.
"""

from __future__ import annotations

import json
import math
import operator
from pathlib import Path
from typing import Any

from torch import fx, nn

_HIDDEN_KINDS = ("placeholder", "output", "param", "constant", "get_attr")
_TUNER_META = "utune_tuner"  # utune_fx.rewrite.attention_sites.TUNER_META (not imported: matching needs no rewriter)


def _shape(shape: Any) -> str:
    return "x".join(map(str, shape)) if shape else "-"


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


def owner(path: str, modules: dict) -> str:
    """The module ``path`` (a scope, maybe with ``@`` and a call count) sits in: its nearest known ancestor."""
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


def read_history(path: Path) -> list[dict] | None:
    """A run's metrics.jsonl for the page's curves, or None when there is none. The run directory may come
    from someone else: size-bounded, each line a JSON object whose epoch is a number, else one line naming
    the file and line."""
    from utune_fx.errors import UtuneError
    from utune_fx.schemas import MAX_JSON_BYTES

    if not path.is_file():
        return None
    if path.stat().st_size > MAX_JSON_BYTES:
        raise UtuneError(f"{path}: {path.stat().st_size:,} bytes is over the limit of {MAX_JSON_BYTES:,}")
    rows = []
    for number, line in enumerate(path.read_bytes()[: MAX_JSON_BYTES + 1].decode("utf-8", "replace").splitlines()):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        epoch = row.get("epoch") if isinstance(row, dict) else None
        if not isinstance(epoch, int | float) or isinstance(epoch, bool) or not math.isfinite(epoch):
            raise UtuneError(f"{path}:{number + 1}: not a row of training metrics (a JSON object with an epoch)")
        rows.append(row)
    return rows


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
        # the numbers from the rewrite the loader ran; from the manifest (data someone sent, only checked
        # for shape) just where each rule was written, as the loader reads temporary copies of the rules
        recorded = {
            s["rule"]: s["where"]
            for s in (manifest or {}).get("summary", [])
            if isinstance(s.get("rule"), str) and isinstance(s.get("where"), str)
        }
        summaries = [{**vars(s), "where": recorded.get(s.rule, s.where)} for s in result.summaries]
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
        ops.setdefault(owner(info.scope, modules), []).append((label, detail, rule, tag["rule"] if tag else ""))
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
