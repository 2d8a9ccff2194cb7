"""benchmarks/paper_table.py: says exactly what is missing; runs and tabulates on a CUB-shaped toy set."""

import importlib.util
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("paper_table", ROOT / "benchmarks" / "paper_table.py")
paper_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paper_table)


def test_missing_data_and_weights_are_listed_and_nothing_runs(tmp_path, capsys):
    assert (
        paper_table.main(["--data-root", str(tmp_path), "--datasets", "cub", "flowers", "--out", str(tmp_path / "out")])
        == 2
    )
    err = capsys.readouterr().err
    assert f"missing: cub: {tmp_path}/CUB_200_2011/images.txt" in err
    assert f"missing: flowers: {tmp_path}/flowers102/train" in err
    assert "pretrained weights of vit_base_patch16_224.augreg_in21k" in err and "error: " in err
    assert not (tmp_path / "out").exists()


def _cub_like(root: Path, classes: int = 3, per_class: int = 6) -> None:
    folder = root / "CUB_200_2011"
    rng = np.random.default_rng(0)
    ids, split = [], []
    for c in range(classes):
        (folder / "images" / f"{c:03d}.bird").mkdir(parents=True)
        for i in range(per_class):
            path = f"{c:03d}.bird/{i}.png"
            pixels = np.full((12, 12, 3), 40 + 80 * c, np.uint8) + rng.integers(0, 20, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "images" / path)
            ids.append(f"{len(ids) + 1} {path}")
            split.append(f"{len(split) + 1} {int(i < 4)}")
    (folder / "images.txt").write_text("\n".join(ids) + "\n")
    (folder / "train_test_split.txt").write_text("\n".join(split) + "\n")


def test_a_small_table_runs_from_the_distributed_cub_layout(tmp_path):
    _cub_like(tmp_path)
    config = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    config["backbone"] = "timm:vit_tiny_patch16_224?img_size=16&patch_size=4&depth=1&num_classes={classes}"
    config["training"].update(epochs=1, batch_size=4, warmup_epochs=0, val_size=2)
    config["datasets"]["cub"]["classes"] = 3
    methods = ["linear_probe", "dual_utuner"]
    rows = paper_table.run(config, tmp_path, tmp_path / "runs", ["cub"], methods)
    split = (tmp_path / "CUB_200_2011" / "utune_split.txt").read_text().splitlines()
    assert len(split) == 18 and split[0] == "000.bird/0.png train" and split[4] == "000.bird/4.png test"
    assert [r["method"] for r in rows] == methods and all(0 <= r["test_accuracy"] <= 1 for r in rows)
    assert rows[1]["trainable_millions"] > rows[0]["trainable_millions"]
    text = paper_table.table(rows, ["cub"], methods)
    assert text.splitlines()[0] == "| method | cub | trainable M |" and "| dual_utuner | " in text
    again = paper_table.run(config, tmp_path, tmp_path / "runs", ["cub"], methods)  # finished runs are kept
    assert again == rows
