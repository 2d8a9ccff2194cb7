"""The EfficientNet-Lite0 -> CIFAR-10 table and plot, from benchmarks/results/transfer_cifar10.json.

    python benchmarks/transfer_cifar10.py --report   ->  markdown on stdout, docs/images/transfer_cifar10.png

Rows: the oracle (closed form, no seeds) and every finished method: top-1 on the 10,000 test images,
mean +- sample standard deviation over seeds 0, 1, 2 at the rate the search chose; the rates the search
added past its grid are marked. A trained linear probe more than 2 points under the oracle is said
first, loudly (benchmarks/oracle.py: probe_gap).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.oracle import ORACLE, probe_gap
from utune_fx.train.plots import plot_accuracy_vs_parameters

ROOT = Path(__file__).resolve().parents[1]
PLOT = ROOT / "docs" / "images" / "transfer_cifar10.png"
GROUPS = {"linear probe": "baseline", "full fine-tuning": "baseline", "bitfit": "earlier PETL"}


def _group(method: str) -> str:
    return GROUPS.get(method, "U-Tuner" if "U-Tuner" in method else "earlier PETL")


def _rates(row: dict) -> str:
    extended = row.get("lr_extended") or []
    return f"{row['lr']:g}" + (" (grid extended: " + ", ".join(f"{lr:g}" for lr in extended) + ")" if extended else "")


def write_report(results: dict) -> str:
    rows = results["results"]
    oracle = next((row for row in rows if row["method"] == ORACLE), None)
    methods = [row for row in rows if row["method"] != ORACLE]
    lines = []
    probe = next((row for row in methods if row["method"] == "linear probe"), None)
    if oracle and probe and (warning := probe_gap(probe["test_accuracy"], oracle["test_accuracy"])):
        lines += [f"**{warning}**", ""]
    lines += [
        "| method | lr (chosen on validation) | test top-1 (mean +- std, 3 seeds) | per seed | trainable params | s/epoch |",
        "|---|---|---:|---|---:|---:|",
    ]
    if oracle:
        lines.append(
            f"| {ORACLE} on frozen features (C={oracle['C']:g}) | closed form | {100 * oracle['test_accuracy']:.1f} | "
            f"| {oracle['trainable_parameters']:,} | |"
        )
    for row in methods:
        seeds = ", ".join("diverged" if a is None else f"{100 * a:.1f}" for a in row["test_accuracy_per_seed"])
        lines.append(
            f"| {row['method']} | {_rates(row)} | {100 * row['test_accuracy']:.1f} +- "
            f"{100 * row['test_accuracy_std']:.1f} | {seeds} | {row['trainable_parameters']:,} | "
            f"{row['seconds_per_epoch']:.1f} |"
        )
    rates = sorted({float(lr) for row in methods for lr in row["val_accuracy_per_lr"]})
    lines += [
        "",
        "Validation accuracy (%) of the learning-rate search (seed 0, 500 images):",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |",
        "|---|" + "---:|" * len(rates),
    ]
    for row in methods:
        tried = row["val_accuracy_per_lr"]
        cells = [tried.get(f"{lr:g}", "") for lr in rates]
        lines.append(
            f"| {row['method']} | "
            + " | ".join(f"{100 * c:.1f}" if isinstance(c, float) else str(c) for c in cells)
            + " |"
        )
    if methods:
        setup = results["setup"]
        plot_accuracy_vs_parameters(
            [
                {**row, "group": _group(row["method"]), "mean": row["test_accuracy"], "std": row["test_accuracy_std"]}
                for row in methods
            ],
            PLOT,
            f"EfficientNet-Lite0 (ImageNet) on CIFAR-10, {setup['train_images']:,} images, {setup['size']} px, "
            f"{setup['epochs']} epochs",
            reference=("oracle: logistic regression on frozen features", oracle["test_accuracy"]) if oracle else None,
        )
    return "\n".join(lines)
