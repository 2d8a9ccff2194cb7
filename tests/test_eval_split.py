"""eval --split val measures the run's own validation images (issue 16, point 6): train records its split
in OUT/split.json, eval draws the same images again and checks them, or refuses in one line."""

import contextlib
import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from utune_fx.cli import main
from utune_fx.data import load_data

SPEC = "timm:vit_tiny_patch16_224?img_size=16&patch_size=4&depth=2&num_classes=10&global_pool=avg"
RULES = "dual_utuner"  # the shipped rule file, found from any folder
ONE_EPOCH = ["--epochs", "1", "--lr", "1e-2", "--no-augment", "--label-smoothing", "0"]
SELECTION = ["--shots", "5", "--val-size", "20", "--seed", "3"]


def _train(argv: list[str]) -> tuple[int, int]:
    """Train; the training and validation image counts that train reported."""
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", SPEC, "--rules", RULES, *ONE_EPOCH, *argv]) == 0, err.getvalue()
    counts = re.search(r"(\d+) training, (\d+) validation", err.getvalue())
    return int(counts[1]), int(counts[2])


def _eval(argv: list[str], capsys) -> dict:
    assert main(["eval", *argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _refused(argv: list[str], capsys, pattern: str) -> str:
    assert main(["eval", *argv]) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and re.search(pattern, err), err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("split") / "run"
    reported = _train(["--data", "digits", *SELECTION, "-o", str(out)])
    return out, reported


def test_eval_val_measures_the_images_training_validated_on(run, capsys):
    out, (_, reported_val) = run
    record = json.loads((out / "split.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    redrawn = load_data("digits", input_size=(3, 16, 16), shots=5, val_size=20, seed=3).val
    assert record["val"] == {"images": reported_val, "sha256": redrawn.sha256()} and reported_val == 20
    assert record["selection"] == {"shots": 5, "train_size": None, "val_size": 20, "seed": 3, "skip_bad_images": False}
    everything = len(load_data("digits", input_size=(3, 16, 16)).val)  # what eval measured before: 144 others
    for directory in (out, out / "tuned"):  # the run, or its tuned/ (the last epoch's weights)
        report = _eval([str(directory), "--split", "val", "-o", str(out / "eval")], capsys)
        assert report["split"] == "validation" and report["run_split"] is True and report["data"] == "digits"
        assert report["images"] == reported_val != everything
        assert report["images_sha256"] == record["val"]["sha256"]
        assert report["selection"] == record["selection"]
        assert report["top1"] == pytest.approx(summary["last_val_accuracy"])
        assert json.loads((out / "eval" / "eval.json").read_text())["images_sha256"] == record["val"]["sha256"]
    report = _eval([str(out), "--split", "val", "--data", "digits", "--seed", "3"], capsys)  # the run's own: fine
    assert report["images"] == reported_val
    report = _eval([str(out), "-o", str(out / "eval")], capsys)  # --split test: the source's, unchanged
    assert report["split"] == "test" and report["images"] == 359 and report["run_split"] is True
    assert report["top1"] == pytest.approx(summary["test_accuracy"])


def test_other_data_or_seed_for_the_run_validation_images_is_refused(run, capsys):
    out, _ = run
    _refused(
        [str(out), "--split", "val", "--data", "digits?classes=0,1,2,3,4,5,6,7,8,9"],
        capsys,
        r"drawn from the run's --data digits, not digits\?classes=.*; pass --data digits, or leave --data out",
    )
    _refused([str(out), "--split", "val", "--seed", "0"], capsys, r"drew with --seed 3, not 0; leave --seed out")
    # the test split of other data is still measured, and not called the run's
    report = _eval([str(out), "--data", "digits?classes=0,1,2,3,4,5,6,7,8,9", "-o", str(out / "other")], capsys)
    assert report["split"] == "test" and report["run_split"] is False


def test_a_run_or_artifact_without_a_recorded_split_is_refused(run, tmp_path, capsys):
    out, _ = run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "split.json").unlink()
    for argv in ([str(old), "--split", "val"], [str(old / "tuned"), "--split", "val", "--data", "digits"]):
        _refused(argv, capsys, r"records no data split \(.*split.json is missing: the run predates it\); evaluate")
    _refused([str(old)], capsys, r"records no data split .*; give --data SPEC")
    artifact = tmp_path / "artifact"
    shutil.copytree(out / "tuned", artifact)
    _refused(
        [str(artifact), "--split", "val", "--data", "digits"],
        capsys,
        r"is a tuned artifact, not a training run, and records no data split; name the run directory",
    )
    assert _eval([str(old), "--data", "digits"], capsys)["run_split"] is False  # the test split as before
    (old / "split.json").write_text(json.dumps({"format": "utune_fx.split/1", "data": "digits"}))
    _refused([str(old), "--split", "val"], capsys, r"split.json: .*'source' is a required property; a damaged")


def _image_folder(root, per_class: int = 4):
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 20 * c + i, np.uint8)).save(root / f"class{c}" / f"{i}.png")


def test_data_without_a_test_split_falls_back_to_the_run_validation_images(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _image_folder(tmp_path / "images")
    _, reported_val = _train(["--data", "imagefolder:images", "--val-size", "6", "-o", "run"])
    record = json.loads((tmp_path / "run" / "split.json").read_text())
    assert record["source"] == f"imagefolder:{tmp_path / 'images'}" and record["test"] is None
    monkeypatch.chdir(tmp_path / "run")  # the data named from another folder is the same data
    for argv in (["."], [".", "--data", "imagefolder:../images"], [".", "--split", "val"]):
        report = _eval([*argv, "-o", "eval"], capsys)
        assert report["split"] == "validation" and report["images"] == reported_val == 6 and report["run_split"]
        assert report["images_sha256"] == record["val"]["sha256"]
    shutil.copytree(tmp_path / "images", tmp_path / "copy")  # other data without a test split: nothing to fall to
    _refused([".", "--data", "imagefolder:../copy"], capsys, r"\.\./copy has no test split, so eval measures the run's")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "class0" / "0a.png")  # data changed
    _refused([".", "--split", "val"], capsys, r"the validation images drawn from imagefolder:images now .* changed")


def test_a_resumed_run_must_draw_the_images_it_started_with(tmp_path, capsys):
    _image_folder(tmp_path / "images")
    argv = ["--data", f"imagefolder:{tmp_path / 'images'}", "--val-size", "6", "-o", str(tmp_path / "run")]
    _train(argv)
    shutil.rmtree(tmp_path / "images" / "class0")  # one class fewer: other images, other labels
    _image_folder(tmp_path / "images", per_class=5)
    assert main(["train", SPEC, "--rules", RULES, *ONE_EPOCH, *argv, "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"gives other images than the run started with \(train.* differ from .*split.json\)", err), err
