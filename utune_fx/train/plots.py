"""Figures people would rather look at than read, written as PNG files (atomically).

    plot_curves:     loss and accuracy per epoch, train and validation
    plot_confusion:  the confusion matrix of an evaluation
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
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        loss_axis.plot(epochs, [row[key] for row in history], marker="o", label=label)
    for key, label in (("train_accuracy", "train"), ("val_accuracy", "validation")):
        accuracy_axis.plot(epochs, [row[key] for row in history], marker="o", label=label)
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
    axis.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
             title=f"top-1 {report['top1']:.1%} on {report['images']} images")
    axis.set_xticklabels(classes, rotation=90, fontsize=7)
    axis.set_yticklabels(classes, fontsize=7)
    figure.colorbar(image, ax=axis)
    _save(figure, path)
