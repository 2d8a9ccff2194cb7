"""What --cache-features saves: seconds per epoch without and with the cache, as ratios in one run.

    python benchmarks/feature_cache.py [--model SPEC] [--images 384] [--epochs 3] [--threads 1]

A small ViT (random weights) on synthetic images (--images for training, a quarter of that for
validation, 4 classes), trained by utune_fx.train.train as cli.py train does, for every rule file
whose tuners leave the backbone's features alone: linear_probe (the head reads the last feature) and,
when rules/res_tuning_bypass.yaml is there, Res-Tuning-Bypass (a side ladder reads every block's
output detached). Each is trained twice from the same start, uncached then cached; the
table gives seconds per epoch (training and validation), their ratio, the cache's build time, the ratio
of the whole runs (the cached one with its build), the cache's size, and the largest difference between
the two runs' trained tensors (the cache changes the result by float rounding only). One torch thread by default: on a shared machine the ratios are steadier.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utune_fx  # noqa: E402,F401  (before timm)
from utune_fx.match import load_rules  # noqa: E402
from utune_fx.rewrite.artifact import TunedSource, build_tuned  # noqa: E402

MODEL = "timm:vit_small_patch16_224?img_size=64&patch_size=8&depth=6&num_classes=4"


def _images(count: int, size: int, seed: int):
    """Noise with a bright square in the quarter the class names (4 classes)."""
    import torch
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 4
    images = torch.randn(count, 3, size, size, generator=generator)
    half = size // 2
    for index, label in enumerate(labels.tolist()):
        row, column = divmod(label, 2)
        images[index, :, row * half : row * half + half // 2, column * half : column * half + half // 2] += 2.0
    return TensorDataset(images, labels)


def _run(args, rules: Path, cache: bool) -> tuple[dict, dict]:
    import torch

    from utune_fx.train import TrainConfig, train

    torch.manual_seed(0)  # the same random backbone for both runs
    result = build_tuned(TunedSource(args.model, [], "auto"), [load_rules(rules)], 0)
    size = result.example_inputs[0].shape[-1]
    config = TrainConfig(epochs=args.epochs, batch_size=32, lr=1e-2, device="cpu", cache_features=cache)
    with tempfile.TemporaryDirectory() as out:
        summary = train(
            result.module, _images(args.images, size, 0), _images(args.images // 4, size, 1), config, Path(out)
        )
    return summary, {n: p.detach().clone() for n, p in result.module.named_parameters() if p.requires_grad}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--images", type=int, default=384, help="training images (validation: a quarter)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rule_files = [ROOT / "rules" / "linear_probe.yaml", ROOT / "rules" / "res_tuning_bypass.yaml"]
    rows = []
    for rules in (path for path in rule_files if path.is_file()):
        print(f"{rules.stem}: {args.model}, {args.images} images, {args.epochs} epochs, twice", file=sys.stderr)
        plain, plain_weights = _run(args, rules, cache=False)
        cached, cached_weights = _run(args, rules, cache=True)
        difference = max((plain_weights[n] - cached_weights[n]).abs().max().item() for n in plain_weights)
        rows.append((rules.stem, plain, cached, difference))
    print(f"{args.model}, {args.images} training + {args.images // 4} validation images, {args.threads} thread(s)")
    print(
        f"{'rules':<18} {'uncached s/epoch':>16} {'cached s/epoch':>14} {'per epoch':>9} {'cache build s':>13} "
        f"{f'{args.epochs} epochs + build':>18} {'cache MiB':>9} {'max |diff|':>10}"
    )
    for name, plain, cached, difference in rows:
        whole = plain["wall_seconds"] / (cached["wall_seconds"] + cached["feature_cache_seconds"])
        print(
            f"{name:<18} {plain['seconds_per_epoch']:>16.2f} {cached['seconds_per_epoch']:>14.3f} "
            f"{plain['seconds_per_epoch'] / cached['seconds_per_epoch']:>8.1f}x "
            f"{cached['feature_cache_seconds']:>13.2f} {whole:>17.1f}x {cached['feature_cache_bytes'] / 2**20:>9.1f} "
            f"{difference:>10.1e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
