"""benchmarks/vit_split_cifar.py: the splits, the fresh heads, one run, the learning-rate choice and the verdict."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmark imports its report as benchmarks.vit_split_cifar_report
from benchmarks import vit_split_cifar as bench  # noqa: E402
from benchmarks import vit_split_cifar_report as report  # noqa: E402

KWARGS = {"img_size": 32, "patch_size": 8, "depth": 1, "num_classes": 5}


@pytest.fixture
def tiny_task(tmp_path):
    """A card for a one-block ViT and a 10-class npz with 210 training images per class."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **KWARGS)
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "card.safetensors"))
    (tmp_path / "card.json").write_text(
        json.dumps(
            {
                "timm_model": "vit_tiny_patch16_224",
                "kwargs": KWARGS,
                "normalisation": {"mean": [0.5] * 3, "std": [0.25] * 3},
            }
        )
    )
    rng = np.random.default_rng(0)
    labels = np.arange(2100) % 10
    pixels = (labels[:, None, None, None] * 20 + rng.integers(0, 40, (2100, 32, 32, 3))).astype(np.uint8)
    np.savez(tmp_path / "data.npz", x_train=pixels, y_train=labels, x_test=pixels[:100], y_test=labels[:100])
    return tmp_path / "card.json", tmp_path / "data.npz"


def test_the_splits_hold_out_a_fixed_200_of_the_1000_and_test_on_classes_5_to_9(tiny_task):
    splits = bench.make_splits(*tiny_task)
    full, search, held_out, test = splits.full, splits.search, splits.held_out, splits.test
    config = bench.data_config_of(bench.load_model(str(tiny_task[0])).model)
    assert (len(full), len(search), len(held_out), len(test)) == (1000, 800, 200, 50)
    assert np.array_equal(splits.clean_full.indices, full.indices)  # the oracle's features: the same images
    assert np.array_equal(splits.clean_search.indices, search.indices)
    assert torch.equal(splits.clean_full[0][0], splits.clean_full[0][0])  # unaugmented
    assert np.bincount(full.labels).tolist() == [200] * 5 and np.bincount(held_out.labels).tolist() == [40] * 5
    assert set(held_out.indices) <= set(full.indices) and not set(held_out.indices) & set(search.indices)
    assert np.array_equal(held_out.indices, bench.make_splits(*tiny_task).held_out.indices)  # fixed
    assert set(full.pool.pool.labels[full.pool.indices[full.indices]]) == {5, 6, 7, 8, 9}  # the source's labels
    assert config["mean"] == (0.5, 0.5, 0.5) and config["input_size"] == (3, 32, 32)
    torch.manual_seed(0)
    first, again = full[0][0], full[0][0]
    assert first.shape == (3, 32, 32) and not torch.equal(first, again)  # the card's crop + flip
    assert torch.equal(held_out[0][0], held_out[0][0])  # evaluation images are not augmented


@pytest.mark.parametrize("method", list(bench.METHODS))
def test_every_method_gets_a_fresh_five_class_head_from_its_shipped_rules(tiny_task, method):
    card, _ = tiny_task
    names, _, _, suffix = bench.METHODS[method]
    from utune_fx.rewrite.artifact import TunedSource, build_tuned

    result = build_tuned(TunedSource(f"{card}{suffix}", [], "auto"), bench.rule_sets(names, 5), seed=1)
    head = result.module.get_submodule("head")
    assert head.weight.requires_grad and head.weight.shape == (5, 192)
    assert not torch.equal(head.weight, result.base_model.head.weight)  # not the card's head for old classes
    assert head.weight.abs().sum() == 0 and head.bias.abs().sum() == 0  # fresh: zero (utune_fx/heads.py)
    trainable = sum(p.numel() for p in result.module.parameters() if p.requires_grad)
    base = sum(p.numel() for p in result.base_model.parameters())
    assert (trainable == base) if method == "full fine-tuning" else (965 <= trainable < base / 10)


def test_one_run_trains_on_all_images_and_reports_test_accuracy_and_time(tiny_task):
    splits = bench.make_splits(*tiny_task)
    full, search, held_out, test = splits.full, splits.search, splits.held_out, splits.test
    final = bench.run_one(str(tiny_task[0]), ["utuner_first_layer"], 1e-3, 0, 1, full, None, test)
    assert 0 <= final["test_accuracy"] <= 1 and final["val_accuracy"] is None and final["seconds_per_epoch"] > 0
    assert final["trainable_parameters"] == 7509 and final["backbone_parameters"] > 100 * 7509 / 2
    searched = bench.run_one(str(tiny_task[0]), ["linear_probe"], 1e-2, 0, 1, search, held_out, None)
    assert 0 <= searched["val_accuracy"] <= 1 and searched["test_accuracy"] is None


def test_the_search_extends_past_an_edge_and_resumes_from_the_recorded_rows():
    grid = (1e-3, 3e-3, 1e-2)
    rows = [{"method": "m", "phase": "search", "lr": lr, "val_accuracy": a} for lr, a in zip(grid, (0.5, 0.6, 0.7))]
    assert bench.search_scores(rows[:2], "m") == {1e-3: 0.5, 3e-3: 0.6}
    assert bench.next_rate(grid, bench.search_scores(rows[:2], "m")) == 1e-2  # the grid first
    assert bench.next_rate(grid, bench.search_scores(rows, "m")) == 3e-2  # best at the top edge: one step up
    rows.append({"method": "m", "phase": "search", "lr": 3e-2, "diverged": "loss nan"})
    assert bench.next_rate(grid, bench.search_scores(rows, "m")) is None  # the step lost: done
    assert bench.best_rate(bench.search_scores(rows, "m")) == 1e-2


def _finals(method, accuracies, parameters):
    return [
        {
            "method": method,
            "phase": "final",
            "lr": 1e-3,
            "seed": s,
            "test_accuracy": a,
            "trainable_parameters": parameters,
            "backbone_parameters": 1_000_000,
            "seconds_per_epoch": 2.0,
        }
        for s, a in enumerate(accuracies)
    ]


def test_the_table_and_verdict_follow_the_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "PLOT", tmp_path / "plot.png")
    rows = (
        _finals("linear probe", [0.60, 0.62, 0.64], 1_000)
        + _finals("lora", [0.70, 0.70, 0.70], 50_000)
        + _finals("U-Tuner first layer", [0.69, 0.69, 0.70], 4_000)
        + _finals("dual U-Tuner", [0.72] * 3, 40_000)
        + _finals("VPT deep", [0.65] * 2, 10_000)
    )  # two seeds only: no row yet
    table = report.summarise(rows, bench.METHODS)
    assert [row["method"] for row in table] == ["linear probe", "lora", "U-Tuner first layer", "dual U-Tuner"]
    assert table[0]["mean"] == pytest.approx(0.62) and table[0]["std"] == pytest.approx(0.02)
    assert table[1]["share"] == pytest.approx(0.05)
    text = report.write_report(rows, {"epochs": 8}, bench.METHODS)
    assert "| linear probe | 1,000 | 0.10% | 62.0 +- 2.0 | 0.001 | 2.0 |" in text
    assert "WARNING" not in text  # no oracle recorded: nothing to compare with
    assert "(a) dual U-Tuner the best PETL method: **holds**" in text
    assert (
        "(b) U-Tuner on the first layer close to the best earlier method with >10x fewer parameters: **holds**" in text
        and "(12.5x as many, 16.3x without the 1,000-parameter head both train)" in text
    )
    assert "(c) U-Tuner variants beat VPT, adapter, prefix, bitfit and linear probing on the mean: **holds**" in text
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    oracle = {"method": "oracle: logistic regression", "phase": "oracle", "C": 0.1, "test_accuracy": 0.66}
    text = report.write_report(rows + [oracle | {"feature_width": 192}], {"epochs": 8}, bench.METHODS)
    assert text.startswith("**WARNING: the trained linear probe (62.0%) ends 4.0 points under the closed-form")
    assert "| oracle: logistic regression on frozen features (C=0.1) | 965 | | 66.0 (closed form) |" in text
    close = report.write_report(
        rows + [oracle | {"feature_width": 192, "test_accuracy": 0.635}], {"epochs": 8}, bench.METHODS
    )
    assert "WARNING" not in close  # 1.5 points under: within the bound
    worse = rows + _finals("bitfit", [0.75] * 3, 3_000)
    text = report.write_report(worse, {"epochs": 8}, bench.METHODS)
    assert "(a) dual U-Tuner the best PETL method: **does not hold**" in text and "3.0 points above it" in text
    assert (
        "(c) U-Tuner variants beat VPT, adapter, prefix, bitfit and linear probing on the mean: "
        "**does not hold**" in text
    )
