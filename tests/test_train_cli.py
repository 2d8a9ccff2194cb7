"""cli.py train and eval end to end on scikit-learn's digits: it learns, the result is a
tuned artifact, eval agrees with training, and user errors are one line with exit 2."""

import json

import pytest
import torch

from utune_fx.cli import main
from utune_fx.rewrite.artifact import load_tuned

SPEC = "timm:vit_tiny_patch16_224?img_size=16&patch_size=4&depth=2&num_classes=10&global_pool=avg"
RULES = "rules/dual_utuner.yaml"
FAST = ["--epochs", "4", "--lr", "1e-2", "--no-augment", "--label-smoothing", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "run"
    assert main(["train", SPEC, "--rules", RULES, "--data", "digits", "-o", str(out), *FAST]) == 0
    return out


def test_a_dual_u_tuner_learns_digits(run):
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.6, summary  # a random frozen backbone: chance is 0.1
    assert summary["trainable_parameters"] < 40_000 and summary["epochs"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_run_is_a_tuned_artifact_that_eval_reads(run, capsys):
    tuned = load_tuned(run / "tuned")
    saved = dict(tuned.module.named_parameters())
    assert any(
        name.startswith("utune.") and p.abs().sum() > 0 for name, p in saved.items() if name.endswith("up.weight")
    )  # trained, not the zero init
    assert main(["eval", str(run), "--data", "digits", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    assert report["split"] == "test" and report["images"] == 359
    assert report["top1"] == pytest.approx(summary["test_accuracy"]) and report["top5"] >= report["top1"]
    confusion = torch.tensor(report["confusion"])
    assert confusion.sum() == 359 and confusion.diag().sum() / 359 == pytest.approx(report["top1"])
    assert (run / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_user_errors_are_one_line(tmp_path, capsys):
    wrong = SPEC.replace("&num_classes=10", "")
    cases = [
        (
            ["train", wrong, "--rules", RULES, "--data", "digits", "-o", str(tmp_path / "a")],
            r"the model has 1000 outputs but digits has 10 classes; add num_classes: 10",
        ),
        (
            ["train", SPEC, "--rules", RULES, "--data", "digits", "-o", str(tmp_path / "b"), "--resume"],
            r"checkpoint does not exist; run without --resume",
        ),
        (
            ["train", SPEC, "--data", "digits", "-o", str(tmp_path / "c")],
            r"not a tuned artifact directory; give a "
            r"model spec with --rules",
        ),
        (
            [
                "train",
                SPEC,
                "--rules",
                RULES,
                "--data",
                f"imagefolder:{tmp_path / 'nowhere'}",
                "-o",
                str(tmp_path / "d"),
            ],
            r"nowhere",
        ),
        (
            ["train", SPEC, "--rules", RULES, "--data", "digits", "-o", str(tmp_path / "e"), "--optimizer", "adam"],
            r"--optimizer must be one of adamw, sgd",
        ),
    ]
    import re

    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_an_unreadable_image_stops_the_run_unless_skipped(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    for c in range(10):
        folder = tmp_path / "images" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 20 * c + i, np.uint8)).save(folder / f"{i}.png")
    bad = tmp_path / "images" / "class3" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    argv = [
        "train",
        SPEC,
        "--rules",
        RULES,
        "--data",
        f"imagefolder:{tmp_path / 'images'}",
        "--epochs",
        "1",
        "--val-size",
        "2",
        "--no-augment",
    ]
    assert main([*argv, "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "--skip-bad-images" in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "-o", str(tmp_path / "b"), "--skip-bad-images"]) == 0
    assert f"skipped unreadable image {bad}" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["epochs"] == 1
