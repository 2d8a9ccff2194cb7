"""Readers behind the ``--data`` specs: each turns a spec into a :class:`Source`.

    imagefolder:PATH               PATH/<class>/<image>, or PATH/train + PATH/test (or val)
    imagefolder:PATH?split=FILE    FILE lines: ``<class>/<image> train|test``
    cifar:PATH                     CIFAR-10/100 python batches, read by a safe unpickler (cifar.py)
    npz:PATH                       x_/y_ arrays, or a JPEG-byte pack (train_bytes, ...)
    digits                         scikit-learn's bundled 8x8 digits
    ANY?classes=dog,frog,7         only these classes (names or indices), relabelled 0.. in this order

A :class:`Source` holds image pools (labels known up front, pixels decoded
lazily) and class names; choosing images and transforms is the caller's job.
"""

from __future__ import annotations

import abc
import io
import struct
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
from PIL import Image

from utune_fx.errors import UtuneError

SCHEMES = ("imagefolder:PATH", "cifar:PATH", "npz:PATH", "digits")
OPTIONS = {"classes": "classes=NAME_OR_INDEX,... keeps those classes", "split": "split=FILE (imagefolder only)"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DIGITS_TEST_FRACTION = 0.2
# PIL reports bad image data through many exception types.
PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


class ImagePool(abc.ABC):
    """Images of one split: ``labels`` up front, pixels on demand."""

    labels: np.ndarray
    encoded = True  # holds encoded files that may be corrupt (checked before use)

    def __len__(self) -> int:
        return len(self.labels)

    @abc.abstractmethod
    def describe(self, index: int) -> str:
        """The image's path, or its place in an array file, for messages."""

    def identity(self, index: int) -> str:
        """The image's name within its source, wherever the source lies: a path below the source's
        folder, else its position (what a recorded split's sha256 covers)."""
        return str(index)

    @abc.abstractmethod
    def open(self, index: int) -> Image.Image:
        """The image as stored (not yet converted)."""

    def verify(self, index: int) -> None:
        """Cheap check (headers, PNG checksums) that raises a PIL error on bad data."""
        with self.open(index) as image:
            image.verify()

    def image(self, index: int) -> Image.Image:
        try:
            return self.open(index).convert("RGB")  # grayscale and RGBA become RGB
        except PIL_DECODE_ERRORS as error:
            raise UtuneError(f"cannot decode image {self.describe(index)} ({error}); re-encode or delete it") from error


class FilePool(ImagePool):
    def __init__(self, paths: list[Path], labels: list[int], root: Path | None = None):
        self.paths, self.root = paths, root
        self.labels = np.asarray(labels, dtype=np.int64)

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def identity(self, index: int) -> str:
        path = self.paths[index]
        return (path.relative_to(self.root) if self.root is not None else path).as_posix()

    def open(self, index: int) -> Image.Image:
        return Image.open(self.paths[index])


class ArrayPool(ImagePool):
    """uint8 pixels, [N, H, W] or [N, H, W, C] with C in 1, 3, 4."""

    encoded = False

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, name: str):
        self.pixels, self.labels, self.name = pixels, np.asarray(labels, dtype=np.int64), name

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def open(self, index: int) -> Image.Image:
        pixels = self.pixels[index]
        return Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels)


class JpegPackPool(ImagePool):
    """Encoded images concatenated in one byte array; image i is bytes[offsets[i]:offsets[i+1]]."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray, labels: np.ndarray, name: str):
        self.data, self.offsets, self.name = data, offsets, name
        self.labels = np.asarray(labels, dtype=np.int64)

    def describe(self, index: int) -> str:
        return f"{self.name} image {index}"

    def open(self, index: int) -> Image.Image:
        return Image.open(io.BytesIO(self.data[self.offsets[index] : self.offsets[index + 1]].tobytes()))


@dataclass
class Source:
    classes: list[str]
    train: ImagePool
    test: ImagePool | None
    # A source without a test split of its own asks for this fraction to be held out.
    holdout_test: float | None = None


def read_source(spec: str) -> Source:
    """Parse a ``--data`` spec and read its source."""
    body, _, query = spec.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    scheme, _, location = body.partition(":")
    allowed = {"split", "classes"} if scheme == "imagefolder" else {"classes"}
    if unknown := sorted(set(options) - allowed):
        raise UtuneError(
            f"unknown option {unknown[0]!r} in data spec {spec!r}; options: "
            + "; ".join(OPTIONS[name] for name in sorted(allowed))
        )
    wanted = options.pop("classes", None)
    if scheme == "digits" and not location:
        source = read_digits()
    else:
        from utune_fx.data.cifar import read_cifar  # here: cifar.py builds on this module

        readers = {"imagefolder": read_imagefolder, "cifar": read_cifar, "npz": read_npz}
        if scheme not in readers or not location:
            from utune_fx.data.text import TEXT_SCHEMES

            raise UtuneError(f"unknown data spec {spec!r}; use one of {', '.join(SCHEMES + TEXT_SCHEMES)}")
        path = Path(location).expanduser()
        if not path.exists():
            raise UtuneError(f"data path {path} (from --data {spec}) does not exist; check the path")
        source = readers[scheme](path, **options)
    return source if wanted is None else keep_classes(source, wanted, spec)


class SubsetPool(ImagePool):
    """Some images of another pool, with new labels."""

    def __init__(self, pool: ImagePool, indices: np.ndarray, labels: np.ndarray):
        self.pool, self.indices, self.labels, self.encoded = pool, indices, labels, pool.encoded

    def describe(self, index: int) -> str:
        return self.pool.describe(int(self.indices[index]))

    def identity(self, index: int) -> str:
        return self.pool.identity(int(self.indices[index]))

    def open(self, index: int) -> Image.Image:
        return self.pool.open(int(self.indices[index]))


def keep_classes(source: Source, wanted: str, spec: str) -> Source:
    """Only the classes ``wanted`` names (``dog,frog`` or ``5,6``), labelled 0.. in the order given."""
    chosen = []
    for item in (part.strip() for part in wanted.split(",")):
        if item in source.classes:
            chosen.append(source.classes.index(item))
        elif item.isdigit() and int(item) < len(source.classes):
            chosen.append(int(item))
        else:
            raise UtuneError(
                f"class {item!r} in data spec {spec!r} is neither a class name nor an index below "
                f"{len(source.classes)}; the classes are {', '.join(source.classes[:12])}"
                + (", ..." if len(source.classes) > 12 else "")
            )
    if len(set(chosen)) != len(chosen):
        raise UtuneError(f"data spec {spec!r} names a class twice in classes={wanted}; name each once")
    relabel = np.full(len(source.classes), -1, dtype=np.int64)
    relabel[chosen] = np.arange(len(chosen))

    def subset(pool: ImagePool | None) -> ImagePool | None:
        if pool is None:
            return None
        kept = np.flatnonzero(relabel[pool.labels] >= 0)
        return SubsetPool(pool, kept, relabel[pool.labels[kept]])

    return Source([source.classes[c] for c in chosen], subset(source.train), subset(source.test), source.holdout_test)


# --- imagefolder -------------------------------------------------------------------


def _images_below(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _class_folders(root: Path, known: list[str] | None = None) -> tuple[list[str], FilePool]:
    """Read root/<class>/...; with ``known`` (a test split), classes must be among them."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UtuneError(f"no class folders under {root}; expected {root}/<class>/<image>.jpg, one folder per class")
    found = {folder.name: _images_below(folder) for folder in folders}
    if not any(found.values()):
        raise UtuneError(
            f"no images found under {root} (looked for {', '.join(IMAGE_SUFFIXES)}); put images in one folder per class"
        )
    classes = known if known is not None else [folder.name for folder in folders]
    paths, labels = [], []
    for name, images in found.items():
        if not images:
            raise UtuneError(f"class folder {root / name} has no images; add images or remove the folder")
        if name not in classes:
            raise UtuneError(
                f"folder {root / name} is not a class of the training split; "
                "rename it or add the class to the training split"
            )
        paths += images
        labels += [classes.index(name)] * len(images)
    return classes, FilePool(paths, labels, root)


def _split_file(root: Path, split: str) -> Source:
    """Lines ``<class>/<image> train|test`` (paths below root); '#' starts a comment."""
    file = Path(split).expanduser()
    file = file if file.exists() else root / file
    if not file.is_file():
        raise UtuneError(f"split file {split} not found (looked in the working folder and in {root}); check the path")
    entries = {"train": [], "test": []}
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        relative, role = (line.rsplit(None, 1) + [""])[:2]
        if role not in entries or len(Path(relative).parts) < 2:
            raise UtuneError(f"{file}:{number}: expected '<class>/<image> train|test', got {line!r}")
        if not (root / relative).is_file():
            raise UtuneError(f"{file}:{number}: image {root / relative} does not exist; fix the line or the path")
        entries[role].append(relative)
    if not entries["train"]:
        raise UtuneError(f"no training images listed in {file}; mark lines with 'train'")
    classes = sorted({Path(relative).parts[0] for relative in entries["train"]})
    pools = {}
    for role, relatives in entries.items():
        if unknown := sorted({Path(r).parts[0] for r in relatives} - set(classes)):
            raise UtuneError(
                f"{file}: class {unknown[0]!r} has test images but no training images; list some of its images as train"
            )
        pools[role] = FilePool(
            [root / r for r in relatives], [classes.index(Path(r).parts[0]) for r in relatives], root
        )
    return Source(classes, pools["train"], pools["test"] if entries["test"] else None)


def read_imagefolder(root: Path, split: str | None = None) -> Source:
    if not root.is_dir():
        raise UtuneError(f"imagefolder path {root} is not a folder; give the folder that holds the class folders")
    if split is not None:
        return _split_file(root, split)
    test_dir = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes, train = _class_folders(root / "train")
        return Source(classes, train, _class_folders(test_dir, classes)[1])
    classes, train = _class_folders(root)
    return Source(classes, train, None)


# --- npz -----------------------------------------------------------------------------

ARRAY_KEYS, PACK_KEYS = ("x_train", "y_train"), ("train_bytes", "train_offsets", "train_labels")


def check_labels(labels: np.ndarray, class_count: int, where: str) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= class_count):
        raise UtuneError(
            f"{where}: labels run from {labels.min()} to {labels.max()} but there are "
            f"{class_count} classes; labels must be 0..{class_count - 1}"
        )


def _npz_split(archive, path: Path, split: str) -> ImagePool:
    if f"x_{split}" in archive.files:
        pixels, labels = archive[f"x_{split}"], archive[f"y_{split}"]
        channels_ok = pixels.ndim == 3 or (pixels.ndim == 4 and pixels.shape[-1] in (1, 3, 4))
        if pixels.dtype != np.uint8 or not channels_ok:
            raise UtuneError(
                f"{path}: x_{split} is {pixels.dtype} {list(pixels.shape)}; "
                "expected uint8 images [N, H, W] or [N, H, W, C] with C = 1, 3 or 4"
            )
        if len(pixels) != len(labels):
            raise UtuneError(
                f"{path}: x_{split} has {len(pixels)} images but y_{split} {len(labels)} labels; "
                "give one label per image"
            )
        return ArrayPool(pixels, labels, f"{path} x_{split}")
    offsets = archive[f"{split}_offsets"].astype(np.int64)
    pool = JpegPackPool(archive[f"{split}_bytes"], offsets, archive[f"{split}_labels"], f"{path} {split}")
    if len(offsets) != len(pool) + 1 or np.any(np.diff(offsets) < 0) or offsets[-1] > len(pool.data):
        raise UtuneError(
            f"{path}: {split}_offsets must be N+1 ascending positions within {split}_bytes "
            f"for the N = {len(pool)} labels; rebuild the pack"
        )
    return pool


def read_npz(path: Path) -> Source:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            if not (set(ARRAY_KEYS) <= keys or set(PACK_KEYS) <= keys):
                raise UtuneError(
                    f"{path} has keys {', '.join(sorted(keys)) or '(none)'}; expected "
                    f"{' + '.join(ARRAY_KEYS)} (arrays) or {' + '.join(PACK_KEYS)} (JPEG pack)"
                )
            train = _npz_split(archive, path, "train")
            has_test = {"x_test", "y_test"} <= keys or {"test_bytes", "test_offsets", "test_labels"} <= keys
            test = _npz_split(archive, path, "test") if has_test else None
            class_count = int(max(p.labels.max(initial=-1) for p in (train, test) if p is not None)) + 1
            classes = (
                [str(name) for name in archive["classes"]]
                if "classes" in keys
                else [str(label) for label in range(class_count)]
            )
    except (ValueError, OSError, EOFError) as error:  # not a zip, or object arrays (pickles) inside
        raise UtuneError(f"cannot read {path} as plain npz arrays ({error}); save it with numpy.savez") from error
    for pool in (train, test):
        if pool is not None:
            check_labels(pool.labels, len(classes), str(path))
    return Source(classes, train, test)


# --- digits --------------------------------------------------------------------------


def read_digits() -> Source:
    """scikit-learn's 1,797 8x8 digits; no test split of its own, so one is held out."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # values are 0..16
    return Source(
        [str(name) for name in digits.target_names],
        ArrayPool(pixels, digits.target, "digits"),
        None,
        holdout_test=DIGITS_TEST_FRACTION,
    )
