"""The paper's method table on a transformer: every shipped rule file on a split-CIFAR ViT, one budget.

    python benchmarks/vit_split_cifar.py                 # the whole table (about 1.5 h on 2 cores), resumable
    python benchmarks/vit_split_cifar.py --report        # only redraw the table and plot from the results

Backbone: ../shared/data/vit-split-cifar-a.json, a timm ViT (depth 6, width 192, 32 px, patch 4)
pre-trained on CIFAR-10 classes 0-4. Target: classes 5-9 (never seen), 1,000 training images
(200 per class, seed 0) of which a fixed 200 (40 per class) are held out to choose each method's
learning rate from a grid with seed 0; then seeds 0, 1, 2 train at the chosen rate on all 1,000
and are evaluated on the 5,000 test images of those classes. Every method gets the same epochs,
batch, schedule (AdamW, 1 warm-up epoch, cosine), label smoothing and augmentation (the card's:
reflect-pad 4 + random 32 crop + flip), and a fresh 5-class head (the head rule's num_classes).
Each finished run is appended to the results (JSON lines), so a stopped run resumes where it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import utune_fx  # noqa: E402,F401  (before timm: makes torchvision importable with CPU torch)
from benchmarks.lr_search import best_rate, next_rate  # noqa: E402
from benchmarks.oracle import frozen_features, logistic_oracle  # noqa: E402
from utune_fx.data import ImageDataset, load_data  # noqa: E402
from utune_fx.errors import UtuneError  # noqa: E402
from utune_fx.match import load_rules  # noqa: E402
from utune_fx.rewrite.artifact import TunedSource, build_tuned, data_config_of  # noqa: E402
from utune_fx.specs import load_model  # noqa: E402
from utune_fx.train import TrainConfig, train  # noqa: E402
from utune_fx.train.progress import count_progress  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
CLASSES = "5,6,7,8,9"
PETL_GRID = (1e-3, 3e-3, 1e-2)  # one grid for every parameter-efficient method: none is tuned harder
FULL_GRID = (1e-4, 3e-4, 1e-3)  # every weight moves: a tenth of the rates
RANDOM = "?weights=none"  # the card's architecture, randomly initialised
# name: (rule files, group for the plot, learning-rate grid, spec suffix)
METHODS = {
    "linear probe": (["linear_probe"], "baseline", PETL_GRID, ""),
    "linear probe, random backbone": (["linear_probe"], "baseline", PETL_GRID, RANDOM),
    "full fine-tuning": (["full_finetune"], "baseline", FULL_GRID, ""),
    "bitfit": (["bitfit"], "earlier PETL", PETL_GRID, ""),
    "lora": (["lora"], "earlier PETL", PETL_GRID, ""),
    "sequential adapter": (["adapter"], "earlier PETL", PETL_GRID, ""),
    "prefix": (["prefix"], "earlier PETL", PETL_GRID, ""),
    "prefix, parallel": (["prefix_parallel"], "earlier PETL", PETL_GRID, ""),
    "VPT shallow": (["vpt_shallow"], "earlier PETL", PETL_GRID, ""),
    "VPT deep": (["vpt_deep"], "earlier PETL", PETL_GRID, ""),
    "U-Tuner MHA": (["utuner_mha"], "U-Tuner", PETL_GRID, ""),
    "U-Tuner FFN": (["utuner_ffn"], "U-Tuner", PETL_GRID, ""),
    "U-Tuner blocks": (["utuner_block"], "U-Tuner", PETL_GRID, ""),
    "U-Tuner first layer": (["utuner_first_layer"], "U-Tuner", PETL_GRID, ""),
    "dual U-Tuner": (["dual_utuner"], "U-Tuner", PETL_GRID, ""),
    "Res-Tuning-Bypass": (["res_tuning_bypass"], "Res-Tuning", PETL_GRID, ""),
}
SEEDS = (0, 1, 2)


def rule_sets(names: list[str], classes: int) -> list:
    """The shipped files as they ship, with the head rule re-sizing the classifier to the target's classes
    (a fresh head: the card's was trained for other classes); a file without one gets linear_probe's."""
    loaded = [load_rules(ROOT / "rules" / f"{name}.yaml") for name in names]
    if not any(rule.tuner == "head" for rules in loaded for rule in rules.rules):
        loaded.append(load_rules(ROOT / "rules" / "linear_probe.yaml"))
    for rules in loaded:
        for rule in rules.rules:
            if rule.tuner == "head":
                rule.config = dataclasses.replace(rule.config, num_classes=classes)
    return loaded


def card_augmentation(mean, std):
    """The card's recipe: reflect-pad 4 + random 32 crop, horizontal flip (timm's default random-resized
    crop would throw away most of a 32 px image)."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4, padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


@dataclasses.dataclass
class Splits:
    full: ImageDataset  # the 1,000 training images, augmented (the final runs)
    search: ImageDataset  # 800 of them, augmented (the learning-rate search)
    held_out: ImageDataset  # the other 200, unaugmented (scores the search)
    test: ImageDataset  # the 5,000 test images of classes 5-9
    clean_full: ImageDataset  # the 1,000 and the 800 without augmentation (the oracle's features)
    clean_search: ImageDataset


def make_splits(card: Path, data: Path, seed: int = 0) -> Splits:
    """The splits of classes 5-9, card-normalised (train 1,000 = search 800 + held-out 200; test 5,000)."""
    config = data_config_of(load_model(str(card)).model)  # the card's size and normalisation
    splits = load_data(
        f"npz:{data}?classes={CLASSES}",
        input_size=config["input_size"],
        data_config=config,
        train_size=1000,
        val_size=0,
        seed=seed,
        augment=False,
    )
    chosen = splits.train
    rng = np.random.default_rng([seed, 2])
    held = np.sort(np.concatenate([rng.permutation(chosen.indices[chosen.labels == c])[:40] for c in range(5)]))
    rest = np.setdiff1d(chosen.indices, held)
    augment = card_augmentation(config["mean"], config["std"])
    return Splits(
        full=ImageDataset(chosen.pool, chosen.indices, augment),
        search=ImageDataset(chosen.pool, rest, augment),
        held_out=ImageDataset(chosen.pool, held, chosen.transform),
        test=splits.test,
        clean_full=chosen,
        clean_search=ImageDataset(chosen.pool, rest, chosen.transform),
    )


def run_one(spec: str, names: list[str], lr: float, seed: int, epochs: int, train_set, val_set, test_set) -> dict:
    result = build_tuned(TunedSource(spec, [], "auto"), rule_sets(names, 5), seed=seed)
    config = TrainConfig(epochs=epochs, batch_size=32, lr=lr, warmup_epochs=1, seed=seed, device="cpu")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            summary = train(result.module, train_set, val_set, config, Path(scratch), test_set=test_set)
        except UtuneError as error:  # diverged: this rate loses
            return {"diverged": str(error)}
    backbone = sum(p.numel() for p in result.base_model.parameters())
    return {
        "val_accuracy": summary["last_val_accuracy"],
        "test_accuracy": summary.get("test_accuracy"),
        "trainable_parameters": summary["trainable_parameters"],
        "backbone_parameters": backbone,
        "seconds_per_epoch": summary["seconds_per_epoch"],
    }


def read_results(path: Path, setup: dict) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row.get("setup") == setup]


def append_result(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as out:  # one whole line per run: a stop mid-run loses only that run
        out.write(json.dumps(row) + "\n")


def search_scores(rows: list[dict], method: str) -> dict[float, float | None]:
    """The held-out accuracy of each rate the search ran so far (None: diverged)."""
    return {row["lr"]: row.get("val_accuracy") for row in rows if row["method"] == method and row["phase"] == "search"}


def oracle_row(card: str, splits: Splits) -> dict:
    """Logistic regression on the frozen CLS features (unaugmented): C chosen on the held-out 200 after
    fitting the other 800, refitted on all 1,000, scored on the 5,000 test images."""
    features = [
        frozen_features(card, d) for d in (splits.clean_search, splits.held_out, splits.clean_full, splits.test)
    ]
    return logistic_oracle(*features) | {"phase": "oracle"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--card", default=str(DATA / "vit-split-cifar-a.json"))
    parser.add_argument("--data", default=str(DATA / "cifar10-jpeg.npz"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "vit_split_cifar.jsonl"))
    parser.add_argument("--report", action="store_true", help="only write the table and plot from the results")
    args = parser.parse_args()
    from benchmarks.vit_split_cifar_report import write_report

    setup = {
        "card": Path(args.card).name,
        "data": Path(args.data).name,
        "classes": CLASSES,
        "epochs": args.epochs,
        "batch_size": 32,
        "train_images": 1000,
        "held_out": 200,
        "seeds": list(SEEDS),
        "head_init": "zero (utune_fx/heads.py)",
        "lr_search": "grid extended at an edge, at most 2 steps (benchmarks/lr_search.py)",
    }
    results = Path(args.results)
    if not args.report:
        torch.set_num_threads(min(torch.get_num_threads(), 2))
        splits = make_splits(Path(args.card), Path(args.data))
        rows = read_results(results, setup)
        done = [row for row in rows if row["method"] in args.methods]
        extended = sum(1 for row in done if row["phase"] == "search" and row["lr"] not in METHODS[row["method"]][2])
        total = sum(len(METHODS[m][2]) + len(SEEDS) for m in args.methods) + extended
        if not any(row["phase"] == "oracle" for row in rows):
            row = {"setup": setup, "seed": None, **oracle_row(args.card, splits)}
            append_result(results, row)
            rows.append(row)
        with count_progress("info") as bar:
            task = bar.add_task("runs", total=total, info="")
            bar.advance(task, len(done))
            for method in args.methods:
                names, _, grid, suffix = METHODS[method]
                done = {(row["phase"], row["lr"], row["seed"]) for row in rows if row["method"] == method}

                def record(
                    phase: str,
                    lr: float,
                    seed: int,
                    description: str,
                    *datasets,
                    done=done,
                    method=method,
                    names=names,
                    suffix=suffix,
                ) -> None:
                    if (phase, lr, seed) in done:
                        return
                    bar.update(task, description=f"{method}: {description}")
                    row = {
                        "setup": setup,
                        "method": method,
                        "phase": phase,
                        "lr": lr,
                        "seed": seed,
                        **run_one(args.card + suffix, names, lr, seed, args.epochs, *datasets),
                    }
                    append_result(results, row)
                    rows.append(row)
                    bar.advance(task)

                while (lr := next_rate(grid, search_scores(rows, method))) is not None:
                    if lr not in grid:  # the best rate sat at the grid's edge: one more run
                        bar.update(task, total=bar.tasks[0].total + 1)
                    record("search", lr, 0, f"lr {lr:g} on 800, held-out 200", splits.search, splits.held_out, None)
                lr = best_rate(search_scores(rows, method))
                for seed in SEEDS if lr is not None else ():
                    record("final", lr, seed, f"lr {lr:g}, seed {seed} on 1,000", splits.full, None, splits.test)
    print(write_report(read_results(results, setup), setup, METHODS))


if __name__ == "__main__":
    main()
