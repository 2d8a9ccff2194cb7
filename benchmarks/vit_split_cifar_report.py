"""The split-CIFAR ViT table, plot and verdict, from the results benchmarks/vit_split_cifar.py appends.

    python benchmarks/vit_split_cifar.py --report   ->  markdown on stdout, docs/images/vit_split_cifar.png

Rows: every method with all its seeds finished. Accuracy is top-1 on the 5,000 test images, mean and
sample standard deviation over the seeds; time per epoch is the median of the seeds' runs (robust to
one run slowed by other work on a shared machine).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.oracle import probe_gap
from utune_fx.train.plots import plot_accuracy_vs_parameters

ROOT = Path(__file__).resolve().parents[1]
PLOT = ROOT / "docs" / "images" / "vit_split_cifar.png"
# claim (c)'s comparison set: the earlier methods the paper says U-Tuners beat
CLAIM_C = ("VPT shallow", "VPT deep", "sequential adapter", "prefix", "prefix, parallel", "bitfit", "linear probe")


def summarise(rows: list[dict], methods: dict) -> list[dict]:
    table = []
    for method, (_, group, grid, _) in methods.items():
        finals = [row for row in rows if row["method"] == method and row["phase"] == "final"]
        accuracies = [row["test_accuracy"] for row in finals if row.get("test_accuracy") is not None]
        if len(accuracies) < 3:
            continue
        search = {
            row["lr"]: row.get("val_accuracy") for row in rows if row["method"] == method and row["phase"] == "search"
        }  # the grid and any rates the search added past its edge
        table.append(
            {
                "method": method,
                "group": group,
                "lr": finals[0]["lr"],
                "trainable_parameters": finals[0]["trainable_parameters"],
                "share": finals[0]["trainable_parameters"] / finals[0]["backbone_parameters"],
                "mean": statistics.mean(accuracies),
                "std": statistics.stdev(accuracies),
                "seconds_per_epoch": statistics.median(row["seconds_per_epoch"] for row in finals),
                "held_out": search,
                "extended": sorted(lr for lr in search if lr not in grid),
            }
        )
    return table


def _markdown_table(table: list[dict], oracle: dict | None) -> str:
    lines = [
        "| method | trainable params | share of backbone | top-1 (mean +- std, 3 seeds) | lr | s/epoch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    if oracle is not None:
        lines.append(
            f"| {oracle['method']} on frozen features (C={oracle['C']:g}) | {oracle['feature_width'] * 5 + 5:,} | "
            f"| {100 * oracle['test_accuracy']:.1f} (closed form) | | |"
        )
    for row in table:
        extended = " (grid extended: " + ", ".join(f"{lr:g}" for lr in row["extended"]) + ")" if row["extended"] else ""
        lines.append(
            f"| {row['method']} | {row['trainable_parameters']:,} | {row['share']:.2%} | "
            f"{100 * row['mean']:.1f} +- {100 * row['std']:.1f} | {row['lr']:g}{extended} | "
            f"{row['seconds_per_epoch']:.1f} |"
        )
    return "\n".join(lines)


def _search_table(table: list[dict]) -> str:
    rates = sorted({lr for row in table for lr in row["held_out"]})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|---|" + "---:|" * len(rates)]
    for row in table:
        cells = [row["held_out"].get(lr) for lr in rates]
        lines.append(
            f"| {row['method']} | "
            + " | ".join(
                "" if lr not in row["held_out"] else "diverged" if value is None else f"{100 * value:.1f}"
                for lr, value in zip(rates, cells)
            )
            + " |"
        )
    return "\n".join(lines)


def _points(row: dict) -> str:
    return f"{100 * row['mean']:.1f} +- {100 * row['std']:.1f}"


def verdict(table: list[dict]) -> str:
    """The paper's claims (a)-(c), checked against the means, with the numbers."""
    by = {row["method"]: row for row in table}
    petl = [row for row in table if row["group"] != "baseline" or row["method"] == "linear probe"]
    lines = []
    if "dual U-Tuner" in by and petl:
        best = max(petl, key=lambda row: row["mean"])
        dual = by["dual U-Tuner"]
        holds = best["method"] == "dual U-Tuner"
        lines.append(
            f"- (a) dual U-Tuner the best PETL method: **{'holds' if holds else 'does not hold'}**. "
            f"Dual U-Tuner {_points(dual)}; best PETL method {best['method']} {_points(best)}"
            + ("" if holds else f", {100 * (best['mean'] - dual['mean']):.1f} points above it")
            + "."
        )
    earlier = [row for row in table if row["group"] == "earlier PETL"]
    if "U-Tuner first layer" in by and earlier:
        first, best = by["U-Tuner first layer"], max(earlier, key=lambda row: row["mean"])
        ratio = best["trainable_parameters"] / first["trainable_parameters"]
        gap = 100 * (best["mean"] - first["mean"])
        close = gap <= 100 * max(best["std"], first["std"]) + 1.0
        holds = close and ratio > 10
        head = by["linear probe"]["trainable_parameters"] if "linear probe" in by else 0
        without_head = (best["trainable_parameters"] - head) / max(first["trainable_parameters"] - head, 1)
        lines.append(
            f"- (b) U-Tuner on the first layer close to the best earlier method with >10x fewer parameters: "
            f"**{'holds' if holds else 'does not hold'}**. First layer {_points(first)} with "
            f"{first['trainable_parameters']:,} parameters; best earlier method {best['method']} "
            f"{_points(best)} with {best['trainable_parameters']:,} ({ratio:.1f}x as many"
            + (f", {without_head:.1f}x without the {head:,}-parameter head both train" if head else "")
            + f"); gap {gap:+.1f} points (close = within one std plus 1 point: {'yes' if close else 'no'})."
        )
    variants = [row for row in table if row["group"] == "U-Tuner"]
    rivals = [by[name] for name in CLAIM_C if name in by]
    if variants and rivals:
        strongest = max(rivals, key=lambda row: row["mean"])
        beaten = [row for row in variants if row["mean"] > strongest["mean"]]
        lines.append(
            f"- (c) U-Tuner variants beat VPT, adapter, prefix, bitfit and linear probing on the mean: "
            f"**{'holds' if len(beaten) == len(variants) else 'holds for some' if beaten else 'does not hold'}**"
            f". The strongest of those is {strongest['method']} {_points(strongest)}; "
            f"{len(beaten)} of {len(variants)} U-Tuner variants are above it"
            + (f" ({', '.join(row['method'] + ' ' + _points(row) for row in beaten)})" if beaten else "")
            + (
                f"; below it: {', '.join(row['method'] + ' ' + _points(row) for row in variants if row not in beaten)}"
                if len(beaten) < len(variants)
                else ""
            )
            + "."
        )
    return "\n".join(lines)


def write_report(rows: list[dict], setup: dict, methods: dict) -> str:
    table = summarise(rows, methods)
    oracle = next((row for row in rows if row["phase"] == "oracle"), None)
    probe = next((row for row in table if row["method"] == "linear probe"), None)
    warning = probe_gap(probe["mean"], oracle["test_accuracy"]) if oracle and probe else None
    if table:
        plot_accuracy_vs_parameters(
            [row for row in table if row["method"] != "linear probe, random backbone"],
            PLOT,
            f"ViT (depth 6, width 192) on CIFAR-10 classes 5-9, 1,000 images, {setup['epochs']} epochs",
            reference=("oracle: logistic regression on frozen features", oracle["test_accuracy"]) if oracle else None,
        )
    return "\n\n".join(
        ([f"**{warning}**"] if warning else [])
        + [
            _markdown_table(table, oracle),
            "Held-out accuracy (%) of the learning-rate search, seed 0:",
            _search_table(table),
            "Verdict:",
            verdict(table),
        ]
    )
