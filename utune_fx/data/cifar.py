"""CIFAR-10/100 python batches, the one pickle format utune_fx reads, through an unpickler that rebuilds
dicts, bytes, numbers and numpy arrays and refuses every other global.

    cifar:PATH  ->  read_cifar(PATH)  ->  Source(class names, train pool, test pool)
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from utune_fx.data.sources import ArrayPool, Source, check_labels
from utune_fx.errors import UtuneError

_NUMPY_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
# What the CIFAR python batches need to rebuild their numpy arrays; nothing else.
CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_CORE.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_CORE.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class SafeCifarUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, str, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) in CIFAR_PICKLE_GLOBALS:
            return CIFAR_PICKLE_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"it needs {module}.{name}, which a CIFAR batch never does")


def _unpickle_dict(file: Path, keys: tuple[str, ...]) -> dict:
    try:
        with open(file, "rb") as stream:
            content = SafeCifarUnpickler(stream, encoding="bytes").load()  # bytes: Python 2 pickles
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise UtuneError(f"refusing to load {file}: {error}; use the original CIFAR python batches") from error
    if isinstance(content, dict):
        content = {key.decode("latin-1") if isinstance(key, bytes) else key: value for key, value in content.items()}
    if not isinstance(content, dict) or any(key not in content for key in keys):
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise UtuneError(
            f"{file} is not a CIFAR python batch: expected a dict with {', '.join(keys)}, "
            f"found {found}; use the original CIFAR python batches"
        )
    return content


def _cifar_batch(file: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle_dict(file, ("data", label_key))
    data, labels = batch["data"], np.asarray(batch[label_key], dtype=np.int64)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (len(labels), 3 * 32 * 32):
        raise UtuneError(
            f"{file}: 'data' is not a uint8 array of shape [{len(labels)}, 3072]; use the original CIFAR python batches"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # rows are channel-major


def read_cifar(root: Path) -> Source:
    if (root / "data_batch_1").is_file():  # CIFAR-10
        train_files = sorted(root.glob("data_batch_*"))
        test_file, meta_file = root / "test_batch", root / "batches.meta"
        label_key, names_key = "labels", "label_names"
    elif (root / "train").is_file():  # CIFAR-100: fine labels
        train_files, test_file, meta_file = [root / "train"], root / "test", root / "meta"
        label_key, names_key = "fine_labels", "fine_label_names"
    else:
        raise UtuneError(
            f"{root} holds neither data_batch_1..5 + test_batch (CIFAR-10) nor train + test (CIFAR-100); "
            "point cifar: at the extracted cifar-10-batches-py or cifar-100-python folder"
        )
    for file in (test_file, meta_file):
        if not file.is_file():
            raise UtuneError(f"{file} is missing; keep the CIFAR folder as it was extracted")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle_dict(meta_file, (names_key,))[names_key]]
    parts = [_cifar_batch(file, label_key) for file in train_files]
    train = ArrayPool(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), f"{root} train")
    test = ArrayPool(*_cifar_batch(test_file, label_key), f"{root} test")
    for pool in (train, test):
        check_labels(pool.labels, len(names), str(root))
    return Source(names, train, test)
