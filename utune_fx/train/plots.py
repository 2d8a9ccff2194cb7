"""Figures people would rather look at than read, written as PNG files (atomically).

plot_curves:     loss and accuracy per epoch, train and validation
plot_confusion:  the confusion matrix of an evaluation
plot_accuracy_vs_parameters:  methods as points, accuracy against trainable parameters (log x)
"""

from __future__ import annotations

from pathlib import Path

from utune_fx.atomic import replace_file


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    with replace_file(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    _pyplot().close(figure)


def plot_curves(history: list[dict], path: Path) -> None:
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    present = [key for key in ("train", "val") if history and f"{key}_loss" in history[0]]  # no val: a final run
    for key in present:
        label = {"train": "train", "val": "validation"}[key]
        loss_axis.plot(epochs, [row[f"{key}_loss"] for row in history], marker="o", label=label)
        accuracy_axis.plot(epochs, [row[f"{key}_accuracy"] for row in history], marker="o", label=label)
    loss_axis.set(title="loss", xlabel="epoch")
    accuracy_axis.set(title="top-1 accuracy", xlabel="epoch", ylim=(0, 1))
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    _save(figure, path)


def plot_confusion(report: dict, path: Path) -> None:
    plt = _pyplot()
    classes = list(report["per_class"])
    size = max(4.0, 0.45 * len(classes))
    figure, axis = plt.subplots(figsize=(size + 1.5, size))
    image = axis.imshow(report["confusion"], cmap="Blues")
    axis.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xlabel="predicted",
        ylabel="true",
        title=f"top-1 {report['top1']:.1%} on {report['images']} images",
    )
    axis.set_xticklabels(classes, rotation=90, fontsize=7)
    axis.set_yticklabels(classes, fontsize=7)
    figure.colorbar(image, ax=axis)
    _save(figure, path)


def plot_accuracy_vs_parameters(
    rows: list[dict], path: Path, title: str, reference: tuple[str, float] | None = None
) -> None:
    """rows: {method, trainable_parameters, mean, std, group}; the PETL papers' figure, log-scale x.
    Each method has its own colour and a legend entry (labels beside the points would overlap).
    ``reference`` (label, accuracy): a dashed horizontal line, e.g. the closed-form oracle."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(10, 5))
    markers = {"U-Tuner": "o", "earlier PETL": "s", "baseline": "^"}
    colours = plt.get_cmap("tab20").colors
    for index, row in enumerate(sorted(rows, key=lambda r: -r["mean"])):
        axis.errorbar(
            row["trainable_parameters"],
            100 * row["mean"],
            yerr=100 * row["std"],
            capsize=3,
            fmt=markers.get(row["group"], "D"),
            color=colours[index % len(colours)],
            markersize=7,
            label=f"{row['method']} ({row['group']})",
        )
    if reference is not None:
        axis.axhline(100 * reference[1], color="grey", linestyle="--", linewidth=1, label=reference[0])
    axis.set_xscale("log")
    axis.set(
        xlabel="trainable parameters (log scale)", ylabel="top-1 accuracy (%), mean +- std over seeds", title=title
    )
    axis.grid(alpha=0.3, which="both")
    axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title="best first")
    _save(figure, path)
