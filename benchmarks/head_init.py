"""How a fresh classifier should start: the head alone, trained on frozen features, per initialisation.

    python benchmarks/head_init.py [--tasks cnn vit] [--seeds 0 1 2]

Both transfer tasks of the benchmarks: EfficientNet-Lite0 (ImageNet weights) on CIFAR-10 (1,000
training images, 500 validation, 10,000 test, 96 px) and the split-CIFAR ViT card on classes 5-9
(1,000 training images, 5,000 test; unaugmented here). The frozen features are computed once; each
initialisation then trains an nn.Linear with utune_fx's own loop and the benchmarks' recipe (8
epochs, batch 32, AdamW, warm-up + cosine, label smoothing 0.1, weight decay 0.05, clipping 1.0) at
each rate of the linear probe's grid and 3 seeds, next to the closed-form oracle (benchmarks/oracle.py).
Prints one table per task: test accuracy, mean +- std over seeds, best rate by validation accuracy.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import utune_fx  # noqa: E402,F401  (before timm: makes torchvision importable with CPU torch)
from benchmarks.oracle import frozen_features, logistic_oracle  # noqa: E402
from utune_fx.train import TrainConfig, evaluate, train  # noqa: E402

INITS = {
    # timm's EfficientNet/MobileNet classifier init (efficientnet_builder._init_weight_goog): U(+-1/sqrt(classes))
    "timm EfficientNet (uniform 1/sqrt(classes))": lambda w: nn.init.uniform_(
        w, -1 / math.sqrt(len(w)), 1 / math.sqrt(len(w))
    ),
    "torch nn.Linear default": lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)),
    "trunc normal, std 0.02": lambda w: nn.init.trunc_normal_(w, std=0.02),
    "trunc normal, std 0.01": lambda w: nn.init.trunc_normal_(w, std=0.01),
    "zero": nn.init.zeros_,
}


def task_features(task: str, data: Path) -> dict:
    """(features, labels) per split: search_train/search_val choose the rate (and C), final_train/test report."""
    if task == "cnn":
        from benchmarks.transfer_cifar10 import SPEC, cnn_splits

        splits = cnn_splits(data, 96)
        train_f, val_f = frozen_features(SPEC, splits.train), frozen_features(SPEC, splits.val)
        return {
            "search_train": train_f,
            "search_val": val_f,
            "final_train": train_f,
            "test": frozen_features(SPEC, splits.test),
        }
    from benchmarks.vit_split_cifar import make_splits

    card = str(data.parent / "vit-split-cifar-a.json")
    splits = make_splits(Path(card), data)
    return {
        "search_train": frozen_features(card, splits.clean_search),
        "search_val": frozen_features(card, splits.held_out),
        "final_train": frozen_features(card, splits.clean_full),
        "test": frozen_features(card, splits.test),
    }


def train_head(init, features, lr: float, seed: int, train_key: str, score_key: str) -> float:
    x, y = (torch.from_numpy(a) for a in features[train_key])
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], int(y.max()) + 1)
    with torch.no_grad():
        init(head.weight)
        head.bias.zero_()
    config = TrainConfig(epochs=8, batch_size=32, lr=lr, warmup_epochs=1, seed=seed, device="cpu")
    with tempfile.TemporaryDirectory() as scratch:
        train(head, TensorDataset(x.float(), y), None, config, Path(scratch))
    sx, sy = (torch.from_numpy(a) for a in features[score_key])
    return evaluate(head, TensorDataset(sx.float(), sy), config, torch.device("cpu"))["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpeg.npz")
    parser.add_argument("--tasks", nargs="*", default=["cnn", "vit"], choices=["cnn", "vit"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    grids = {"cnn": (3e-3, 1e-2, 3e-2), "vit": (1e-3, 3e-3, 1e-2)}  # each benchmark's linear-probe grid
    for task in args.tasks:
        features = task_features(task, args.data)
        oracle = logistic_oracle(
            features["search_train"], features["search_val"], features["final_train"], features["test"]
        )
        print(f"\n{task}: oracle (logistic regression, C={oracle['C']:g}) test {oracle['test_accuracy']:.1%}")
        print(
            "| init | " + " | ".join(f"val @ lr {lr:g}" for lr in grids[task]) + " | chosen lr | test (mean +- std) |"
        )
        print("|---|" + "---:|" * (len(grids[task]) + 2))
        for name, init in INITS.items():
            val = {
                lr: statistics.mean(train_head(init, features, lr, s, "search_train", "search_val") for s in args.seeds)
                for lr in grids[task]
            }
            lr = max(grids[task], key=lambda r: (val[r], -r))
            test = [train_head(init, features, lr, s, "final_train", "test") for s in args.seeds]
            spread = statistics.stdev(test) if len(test) > 1 else 0.0
            print(
                f"| {name} | "
                + " | ".join(f"{100 * val[r]:.1f}" for r in grids[task])
                + f" | {lr:g} | {100 * statistics.mean(test):.1f} +- {100 * spread:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
