"""The paper's method x data set table on a GPU machine with the data on disk (configs/paper.yaml).

    python benchmarks/paper_table.py --data-root /data [--methods dual_utuner lora] [--datasets cub cars]
                                     [--out runs/paper] [--check]

Expected layout under --data-root:
    cifar-100-python/{train,test,meta}                      the CIFAR-100 python batches
    CUB_200_2011/{images/<class>/*.jpg, images.txt, train_test_split.txt}     as distributed
    nabirds/{images/<class>/*.jpg, images.txt, train_test_split.txt}          as distributed
    flowers102/{train,test}/<class>/*.jpg                   Oxford Flowers, sorted into class folders
    stanford_dogs/{train,test}/<class>/*.jpg                from train_list.mat / test_list.mat
    stanford_cars/{train,test}/<class>/*.jpg                from the devkit's annotations
For CUB and NABirds the split file (`path train|test`, docs/data.md) is written from their
own images.txt and train_test_split.txt. Runs that finished are kept (OUT/<data>/<method>/summary.json)
and not repeated; an interrupted one resumes. Before anything runs, every missing data set and
the missing pretrained weights are listed, with what to do, and the script exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utune_fx  # noqa: E402,F401  (before timm)
from utune_fx.errors import UtuneError  # noqa: E402


def _weights_missing(spec: str) -> str | None:
    """None when the backbone's pretrained weights are in the local Hugging Face cache."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    name = spec.split(":", 1)[1].split("?", 1)[0]
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin")):
        return None
    return (
        f"pretrained weights of {name} (Hugging Face Hub {repo}); on a machine with network run once: "
        f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""
    )


def _write_split(folder: Path) -> None:
    """CUB/NABirds: images.txt (id path) + train_test_split.txt (id is_train) -> utune_split.txt."""
    paths = dict(line.split(maxsplit=1) for line in (folder / "images.txt").read_text().splitlines() if line)
    train = dict(line.split() for line in (folder / "train_test_split.txt").read_text().splitlines() if line)
    lines = [f"{paths[i].strip()} {'train' if train[i] == '1' else 'test'}" for i in paths]
    (folder / "utune_split.txt").write_text("\n".join(lines) + "\n")


def plan(config: dict, root: Path, datasets: list[str]) -> list[str]:
    missing = [
        f"{name}: {need.format(root=root)}"
        for name in datasets
        for need in config["datasets"][name]["needs"]
        if not Path(need.format(root=root)).exists()
    ]
    weights = _weights_missing(config["backbone"])
    return missing + ([weights] if weights else [])


def run(config: dict, root: Path, out: Path, datasets: list[str], methods: list[str]) -> list[dict]:
    from utune_fx.train import TrainConfig
    from utune_fx.train.session import load_splits, run_training, tuned_model

    settings = dict(config["training"])
    val_size = settings.pop("val_size")
    rows = []
    for name in datasets:
        entry = config["datasets"][name]
        if "split=" in entry["data"]:
            _write_split(Path(entry["needs"][0].format(root=root)).parent)
        for method in methods:
            run_dir = out / name / method
            if (run_dir / "summary.json").exists():
                summary = json.loads((run_dir / "summary.json").read_text())
            else:
                spec = config["backbone"].format(classes=entry["classes"])
                result = tuned_model(spec, [str(ROOT / r) for r in config["methods"][method]["rules"]], None, "auto")
                splits = load_splits(result, entry["data"].format(root=root), val_size=val_size, seed=settings["seed"])
                train_config = TrainConfig(**settings, lr=config["methods"][method]["lr"])
                resume = (run_dir / "checkpoint").is_dir()
                summary = run_training(result, splits, train_config, run_dir, resume)
            rows.append(
                {
                    "dataset": name,
                    "method": method,
                    "test_accuracy": summary.get("test_accuracy"),
                    "trainable_millions": summary["trainable_parameters"] / 1e6,
                }
            )
    return rows


def table(rows: list[dict], datasets: list[str], methods: list[str]) -> str:
    cell = {(r["method"], r["dataset"]): r for r in rows}
    lines = ["| method | " + " | ".join(datasets) + " | trainable M |", "|---" * (len(datasets) + 2) + "|"]
    for method in methods:
        scores = [cell[(method, d)]["test_accuracy"] for d in datasets]
        trainable = cell[(method, datasets[0])]["trainable_millions"]
        lines.append(f"| {method} | " + " | ".join(f"{s:.1%}" for s in scores) + f" | {trainable:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    config = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--datasets", nargs="*", default=list(config["datasets"]), choices=list(config["datasets"]))
    parser.add_argument("--methods", nargs="*", default=list(config["methods"]), choices=list(config["methods"]))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "paper")
    parser.add_argument("--check", action="store_true", help="only list what is missing")
    args = parser.parse_args(argv)
    missing = plan(config, args.data_root, args.datasets)
    for item in missing:
        print(f"missing: {item}", file=sys.stderr)
    if missing:
        print(f"error: {len(missing)} thing(s) missing for the paper table; see the lines above", file=sys.stderr)
        return 2
    if args.check:
        print("everything the table needs is here")
        return 0
    try:
        rows = run(config, args.data_root, args.out, args.datasets, args.methods)
    except UtuneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = table(rows, args.datasets, args.methods)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "table.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
