"""The transfer benchmarks' shared protocol: the learning-rate ladder, the closed-form oracle, the CNN report."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import lr_search, oracle, transfer_cifar10_report  # noqa: E402


@pytest.mark.parametrize(
    ("grid", "scores", "expected"),
    [
        ((3e-3, 1e-2, 3e-2), {}, 3e-3),  # the grid first, in order
        ((3e-3, 1e-2, 3e-2), {3e-3: 0.4, 1e-2: 0.5}, 3e-2),
        ((3e-3, 1e-2, 3e-2), {3e-3: 0.4, 1e-2: 0.6, 3e-2: 0.5}, None),  # best inside: done
        ((3e-3, 1e-2, 3e-2), {3e-3: 0.4, 1e-2: 0.5, 3e-2: 0.6}, 0.1),  # top edge: one rung up the 1-3-10 ladder
        ((3e-3, 1e-2, 3e-2), {3e-3: 0.4, 1e-2: 0.5, 3e-2: 0.6, 0.1: 0.7}, 0.3),  # better again: a second step
        ((3e-3, 1e-2, 3e-2), {3e-3: 0.4, 1e-2: 0.5, 3e-2: 0.6, 0.1: 0.7, 0.3: 0.8}, None),  # at most two
        ((3e-3, 1e-2, 3e-2), {3e-3: 0.4, 1e-2: 0.5, 3e-2: 0.6, 0.1: 0.55}, None),  # the step lost
        ((3e-4, 1e-3, 3e-3), {3e-4: 0.7, 1e-3: 0.6, 3e-3: 0.5}, 1e-4),  # bottom edge: one rung down
        ((3e-4, 1e-3, 3e-3), {3e-4: 0.7, 1e-3: 0.6, 3e-3: 0.5, 1e-4: 0.8}, 3e-5),
        ((3e-4, 1e-3, 3e-3), {3e-4: 0.6, 1e-3: 0.6, 3e-3: None}, 1e-4),  # tie to the smaller; diverged loses
        ((3e-4, 1e-3), {3e-4: None, 1e-3: None}, None),  # every rate diverged
    ],
)
def test_the_rate_search_extends_at_an_edge_at_most_twice(grid, scores, expected):
    got = lr_search.next_rate(grid, scores)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_the_extensions_are_reported_in_the_order_tried():
    assert lr_search.extensions((1e-3, 3e-3), {1e-3: 0.1, 3e-3: 0.2, 1e-2: 0.3, 3e-2: 0.1}) == [1e-2, 3e-2]


def test_the_oracle_separates_separable_features_and_not_noise():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3

    def blobs(n):
        labels = np.arange(n) % 4
        return centres[labels] + rng.normal(size=(n, 16)), labels

    separable = oracle.logistic_oracle(blobs(200), blobs(100), blobs(300), blobs(400))
    assert separable["test_accuracy"] > 0.95 and separable["C"] in oracle.C_GRID
    assert separable["train_images"] == 300 and separable["feature_width"] == 16

    def noise(n):
        return rng.normal(size=(n, 16)), np.arange(n) % 4

    chance = oracle.logistic_oracle(noise(200), noise(100), noise(300), noise(2000))
    assert abs(chance["test_accuracy"] - 0.25) < 0.05  # nothing to find: chance, whatever C was chosen


def test_the_frozen_features_are_timms_pre_logits():
    images = torch.randn(5, 3, 32, 32)
    features, labels = oracle.frozen_features(
        "timm:resnet10t?num_classes=3", TensorDataset(images, torch.arange(5)), batch_size=2
    )
    torch.manual_seed(0)  # load_model builds random models under seed 0
    model = timm.create_model("resnet10t", num_classes=3).eval()
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(images), pre_logits=True)
    assert features.shape == (5, 512) and labels.tolist() == [0, 1, 2, 3, 4]
    assert np.allclose(features, expected.double().numpy(), atol=1e-5)


@pytest.mark.parametrize(("probe", "loud"), [(0.50, True), (0.545, False), (0.60, False)])
def test_a_probe_more_than_two_points_under_the_oracle_is_said_loudly(probe, loud):
    warning = oracle.probe_gap(probe, 0.56)
    assert (warning is not None) == loud
    if loud:
        assert warning.startswith("WARNING: the trained linear probe (50.0%) ends 6.0 points under")


def _method(name, tests, lr=1e-2, extended=(), parameters=12_810):
    return {
        "method": name,
        "lr": lr,
        "lr_extended": list(extended),
        "val_accuracy_per_lr": {"0.003": 0.4, "0.01": 0.5, **{f"{r:g}": 0.55 for r in extended}},
        "test_accuracy": float(np.mean(tests)),
        "test_accuracy_std": float(np.std(tests, ddof=1)),
        "test_accuracy_per_seed": tests,
        "trainable_parameters": parameters,
        "seconds_per_epoch": 7.5,
    }


def test_the_cnn_report_shows_the_oracle_the_seeds_and_the_extended_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(transfer_cifar10_report, "PLOT", tmp_path / "plot.png")
    results = {
        "setup": {"train_images": 1000, "size": 96, "epochs": 8},
        "results": [
            {
                "method": "oracle: logistic regression",
                "C": 0.01,
                "test_accuracy": 0.566,
                "trainable_parameters": 12_810,
            },
            _method("linear probe", [0.55, 0.56, 0.57], lr=3e-2, extended=[0.1]),
            _method("bitfit", [0.60, 0.61, None][:2] + [0.62], parameters=33_818),
        ],
    }
    text = transfer_cifar10_report.write_report(json.loads(json.dumps(results)))
    assert "WARNING" not in text
    assert "| oracle: logistic regression on frozen features (C=0.01) | closed form | 56.6 |" in text
    assert "| linear probe | 0.03 (grid extended: 0.1) | 56.0 +- 1.0 | 55.0, 56.0, 57.0 | 12,810 | 7.5 |" in text
    assert "| bitfit | 0.01 | 61.0 +- 1.0 |" in text
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    results["results"][1] = _method("linear probe", [0.40, 0.41, 0.42])
    loud = transfer_cifar10_report.write_report(results)
    assert loud.startswith("**WARNING: the trained linear probe (41.0%) ends 15.6 points under the closed-form")
