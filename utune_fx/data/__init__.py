"""Training data for ``cli.py train --data SPEC``: read a source, choose images, apply timm transforms.

    splits = load_data("cifar:~/data/cifar-10-batches-py", shots=16, data_config=config)
    image, label = splits.train[0]      # float tensor [3, H, W], int

Specs and source layouts are in :mod:`utune_fx.data.sources`; the rules for
choosing train / val images (shots, train_size, val_size) are in
docs/data.md and :func:`select_train_val`. Every encoded image is checked
before anything is chosen, so a corrupt file fails (or is skipped) here and
not in the middle of training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch.utils.data

from utune_fx.data.sources import PIL_DECODE_ERRORS, SCHEMES, ImagePool, Source, read_source
from utune_fx.errors import UtuneError

__all__ = ["DataSplits", "ImageDataset", "PoolDataset", "SCHEMES", "build_transforms", "load_data", "select_train_val"]

DEFAULT_DATA_CONFIG = {
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),  # ImageNet
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}
HOLDOUT_TEST_SEED = 0  # a held-out test split must not move with --seed


@dataclass
class DataSplits:
    train: torch.utils.data.Dataset  # items: (float tensor [3, H, W], int label); text: see data/text.py
    val: torch.utils.data.Dataset  # held out from the training data (never the test split)
    test: torch.utils.data.Dataset | None  # the source's own test split when it has one
    classes: list[str]  # none for a causal language model's text
    skipped: list[str] = field(default_factory=list)  # unreadable images left out (skip_bad_images)
    task: str = "classification"  # or "causal-lm" (text without labels): what train/tasks.py optimises


class PoolDataset(torch.utils.data.Dataset):
    """The items ``indices`` of a pool (images, or texts: data/text.py), with their labels and a digest."""

    def __init__(self, pool, indices: np.ndarray):
        self.pool, self.indices = pool, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.pool.labels[self.indices]

    def sha256(self) -> str:
        """sha256 over the items' names in their source (``pool.identity``) and labels, in order: the
        same for the same items wherever the source lies, so a run's recorded split can be checked."""
        digest = hashlib.sha256()
        for index, label in zip(self.indices.tolist(), self.labels.tolist()):
            digest.update(f"{self.pool.identity(index)}\t{label}\n".encode(errors="surrogateescape"))
        return digest.hexdigest()


class ImageDataset(PoolDataset):
    """The images ``indices`` of a pool, decoded on access and transformed."""

    def __init__(self, pool: ImagePool, indices: np.ndarray, transform):
        super().__init__(pool, indices)
        self.transform = transform

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[position])
        return self.transform(self.pool.image(index)), int(self.pool.labels[index])


# --- choosing images -----------------------------------------------------------------


def _even_quotas(available: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes as evenly as their ``available`` counts allow."""
    quotas = np.zeros_like(available)
    remaining = total
    order = np.argsort(available, kind="stable")  # the smallest classes first: they cap early
    for left, klass in zip(range(len(order), 0, -1), order):
        quotas[klass] = min(available[klass], -(-remaining // left))
        remaining -= quotas[klass]
    return quotas


def _proportional_quotas(available: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` in proportion to ``available`` (largest remainders round up)."""
    exact = total * available / max(available.sum(), 1)
    quotas = np.floor(exact).astype(np.int64)
    by_remainder = np.argsort(-(exact - quotas), kind="stable")
    quotas[by_remainder[: total - quotas.sum()]] += 1
    return quotas


def _pick(labels: np.ndarray, candidates: np.ndarray, quotas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """quotas[c] random candidates of each class c, sorted."""
    chosen = [rng.permutation(candidates[labels[candidates] == klass])[:quota] for klass, quota in enumerate(quotas)]
    return np.sort(np.concatenate(chosen)) if chosen else candidates[:0]


def _class_counts(labels: np.ndarray, candidates: np.ndarray, class_count: int) -> np.ndarray:
    return np.bincount(labels[candidates], minlength=class_count)


def _val_count(val_size: float | int, of: int) -> int:
    return int(round(val_size * of)) if isinstance(val_size, float) else val_size


def select_train_val(
    labels: np.ndarray,
    candidates: np.ndarray,
    classes: list[str],
    *,
    shots: int | None = None,
    train_size: int | None = None,
    val_size: float | int = 0.1,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation images among ``candidates`` (disjoint, sorted).

    Without shots/train_size, val (a fraction of the candidates, or a count) is
    drawn stratified and the rest is train. With them, train is drawn first
    (``shots`` per class, or ``train_size`` spread evenly), then val (a fraction
    of the train count, or a count) from the candidates left over -- or, when
    too few are left, out of the chosen training images. Same seed, same indices.
    """
    counts = _class_counts(labels, candidates, len(classes))
    train_rng, val_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    if shots is None and train_size is None:
        n_val = _val_count(val_size, len(candidates))
        if n_val >= len(candidates):
            raise UtuneError(
                f"val_size {val_size} leaves no training images out of {len(candidates)}; lower --val-size"
            )
        val = _pick(labels, candidates, _proportional_quotas(counts, n_val), val_rng)
        return np.setdiff1d(candidates, val), val
    if shots is not None:
        if (short := np.flatnonzero(counts < shots)).size:
            raise UtuneError(
                f"class {classes[short[0]]!r} has only {counts[short[0]]} training images, "
                f"fewer than shots={shots}; lower --shots"
            )
        train = _pick(labels, candidates, np.full_like(counts, shots), train_rng)
    else:
        if train_size > len(candidates):
            raise UtuneError(
                f"train_size={train_size} but the source has only {len(candidates)} training images; lower --train-size"
            )
        train = _pick(labels, candidates, _even_quotas(counts, train_size), train_rng)
    n_val = _val_count(val_size, len(train))
    left_over = np.setdiff1d(candidates, train)
    pool = left_over if len(left_over) >= n_val else train
    val = _pick(labels, pool, _proportional_quotas(_class_counts(labels, pool, len(classes)), n_val), val_rng)
    train = np.setdiff1d(train, val)
    if len(train) == 0:
        raise UtuneError(f"val_size {val_size} takes every chosen training image; lower --val-size")
    return train, val


def _check_selection_args(shots, train_size, val_size, seed) -> None:
    if shots is not None and train_size is not None:
        raise UtuneError("give shots (images per class) or train_size (images in total), not both")
    for name, value in (("shots", shots), ("train_size", train_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UtuneError(f"{name} must be a positive integer, got {value!r}")
    fraction_ok = isinstance(val_size, float) and 0 <= val_size < 1
    count_ok = isinstance(val_size, int) and not isinstance(val_size, bool) and val_size >= 0
    if not (fraction_ok or count_ok):
        raise UtuneError(f"val_size must be a fraction in [0, 1) or a count >= 0, got {val_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise UtuneError(f"seed must be a non-negative integer, got {seed!r}")


def _readable(pool: ImagePool, skip_bad_images: bool, skipped: list[str]) -> np.ndarray:
    """Indices of the pool's images that pass PIL's verify; bad ones fail or are recorded."""
    if not pool.encoded:
        return np.arange(len(pool))
    good = []
    for index in range(len(pool)):
        try:
            pool.verify(index)
            good.append(index)
        except PIL_DECODE_ERRORS as error:
            if not skip_bad_images:
                raise UtuneError(
                    f"unreadable image {pool.describe(index)} ({error}); fix or delete it, "
                    "or pass --skip-bad-images to leave it out"
                ) from error
            skipped.append(pool.describe(index))
    return np.asarray(good, dtype=np.int64)


# --- transforms ----------------------------------------------------------------------


def build_transforms(input_size: tuple[int, int, int], data_config: dict | None, augment: bool):
    """(train transform, eval transform): timm's, with the model's mean/std/interpolation/crop_pct."""
    from timm.data import create_transform  # timm is slow to import; only needed here

    config = {**DEFAULT_DATA_CONFIG, **{k: v for k, v in (data_config or {}).items() if v is not None}}
    common = dict(
        input_size=tuple(input_size),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        interpolation=config["interpolation"],
        crop_pct=config["crop_pct"],
    )
    evaluation = create_transform(is_training=False, crop_mode=config.get("crop_mode"), **common)
    return (create_transform(is_training=True, **common) if augment else evaluation), evaluation


# --- the entry point -----------------------------------------------------------------


def load_data(
    spec: str,
    *,
    input_size: tuple[int, int, int] = (3, 224, 224),
    data_config: dict | None = None,
    shots: int | None = None,
    train_size: int | None = None,
    val_size: float | int = 0.1,
    seed: int = 0,
    augment: bool = True,
    skip_bad_images: bool = False,
) -> DataSplits:
    """Read ``spec``, check its images, choose train/val (see :func:`select_train_val`), attach transforms.

    ``input_size`` always sets the output size; ``data_config`` (what
    ``timm.data.resolve_data_config`` returns) supplies mean, std,
    interpolation, crop_pct and crop_mode, ImageNet defaults where absent.
    """
    _check_selection_args(shots, train_size, val_size, seed)
    source: Source = read_source(spec)
    skipped: list[str] = []
    candidates = _readable(source.train, skip_bad_images, skipped)
    test_pool, test_indices = source.test, None
    if test_pool is not None:
        test_indices = _readable(test_pool, skip_bad_images, skipped)
    elif source.holdout_test:  # a fixed test split, the same for every seed
        counts = _class_counts(source.train.labels, candidates, len(source.classes))
        quotas = _proportional_quotas(counts, int(round(source.holdout_test * len(candidates))))
        test_pool = source.train
        test_indices = _pick(source.train.labels, candidates, quotas, np.random.default_rng(HOLDOUT_TEST_SEED))
        candidates = np.setdiff1d(candidates, test_indices)
    if len(candidates) == 0:
        raise UtuneError(f"no readable training images in {spec}; fix or replace the images")
    train, val = select_train_val(
        source.train.labels,
        candidates,
        source.classes,
        shots=shots,
        train_size=train_size,
        val_size=val_size,
        seed=seed,
    )
    train_transform, eval_transform = build_transforms(input_size, data_config, augment)
    return DataSplits(
        train=ImageDataset(source.train, train, train_transform),
        val=ImageDataset(source.train, val, eval_transform),
        test=None if test_pool is None else ImageDataset(test_pool, test_indices, eval_transform),
        classes=list(source.classes),
        skipped=skipped,
    )
