"""The data layer: every --data source, image selection, transforms, the safe CIFAR unpickler, errors."""

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utune_fx.data import SCHEMES, load_data
from utune_fx.data.cifar import CIFAR_PICKLE_GLOBALS
from utune_fx.errors import UtuneError

SMALL = (3, 16, 16)  # keeps transforms cheap; sources hold 8x8 to 12x10 images, so this resizes up
PLAIN = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # tensors keep pixel values / 255
REAL_CIFAR = Path("/work/shared/data/cifar10-jpeg.npz")


def _write_image(path: Path, value: int, size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value // 2, 255 - value)).save(path)
    return path


def _image_folder(root: Path, counts: dict[str, int], suffix=".png") -> Path:
    for index, (name, count) in enumerate(counts.items()):
        for number in range(count):
            _write_image(root / name / f"{number}{suffix}", 40 * index + number)
    return root


def _selected_paths(dataset) -> set[str]:
    return {str(dataset.pool.paths[i]) for i in dataset.indices}


# --- imagefolder -----------------------------------------------------------------------


def test_imagefolder_class_folders_become_labels_and_images_are_resized(tmp_path):
    root = _image_folder(tmp_path / "birds", {"wren": 6, "crow": 4}, suffix=".jpg")
    splits = load_data(f"imagefolder:{root}", input_size=SMALL, val_size=2)
    assert splits.classes == ["crow", "wren"]  # sorted folder names
    assert (len(splits.train), len(splits.val), splits.test) == (8, 2, None)
    image, label = splits.train[0]
    assert image.dtype == torch.float32 and image.shape == SMALL
    assert sorted(splits.train.labels.tolist() + splits.val.labels.tolist()) == [0] * 4 + [1] * 6
    assert not _selected_paths(splits.train) & _selected_paths(splits.val)


@pytest.mark.parametrize("test_folder", ["test", "val"])
def test_imagefolder_train_and_test_folders_are_the_splits(tmp_path, test_folder):
    _image_folder(tmp_path / "train", {"a": 5, "b": 5})
    _image_folder(tmp_path / test_folder, {"a": 2, "b": 1})
    splits = load_data(f"imagefolder:{tmp_path}", input_size=SMALL, val_size=0.2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 3)
    assert splits.test.labels.tolist() == [0, 0, 1]
    held_in = _selected_paths(splits.train) | _selected_paths(splits.val)
    assert all("/train/" in path for path in held_in)  # val comes from train/, never from the test folder


def test_imagefolder_split_file_assigns_train_and_test(tmp_path):
    root = _image_folder(tmp_path / "images", {"x": 3, "y": 3})
    split = tmp_path / "split.txt"
    split.write_text(
        "# path role\nx/0.png train\nx/1.png train\nx/2.png test\n\n"
        "y/0.png train\ny/1.png train  # trailing comment\ny/2.png test\n"
    )
    splits = load_data(f"imagefolder:{root}?split={split}", input_size=SMALL, val_size=0)
    train_files = ("x/0.png", "x/1.png", "y/0.png", "y/1.png")
    assert sorted(_selected_paths(splits.train)) == [str(root / name) for name in train_files]
    assert sorted(_selected_paths(splits.test)) == [str(root / "x/2.png"), str(root / "y/2.png")]
    split.write_text("x/0.png train\nx/1.png holdout\n")
    with pytest.raises(UtuneError, match=r"split.txt:2: expected '<class>/<image> train\|test', got 'x/1.png holdout'"):
        load_data(f"imagefolder:{root}?split={split}")


def test_unreadable_image_fails_naming_it_or_is_skipped(tmp_path):
    root = _image_folder(tmp_path, {"a": 4, "b": 4})
    bad = root / "b" / "2.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(UtuneError, match=rf"unreadable image {bad} .*--skip-bad-images"):
        load_data(f"imagefolder:{root}", input_size=SMALL)
    splits = load_data(f"imagefolder:{root}", input_size=SMALL, val_size=1, skip_bad_images=True)
    assert splits.skipped == [str(bad)]
    assert len(splits.train) + len(splits.val) == 7
    assert str(bad) not in _selected_paths(splits.train) | _selected_paths(splits.val)


# --- cifar -----------------------------------------------------------------------------


class _Python2Pickler(pickle._Pickler):
    """Writes bytes the way Python 2's cPickle wrote str (as the real CIFAR batches hold them)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_python2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_python2_str


def _python2_pickle(obj) -> bytes:
    stream = io.BytesIO()
    _Python2Pickler(stream, protocol=2).dump(obj)
    # NumPy 1.x (which wrote the real files) names its reconstructor numpy.core.multiarray.
    return stream.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def _cifar_rows(labels: list[int]) -> np.ndarray:
    """One row per image: 1024 red, then 1024 green, then 1024 blue values (channel-major)."""
    planes = [np.full((len(labels), 1024), value, np.uint8) for value in (10, 20, 30)]
    planes[2] += np.asarray(labels, np.uint8)[:, None]  # blue tells the label
    return np.concatenate(planes, axis=1)


def _write_cifar10(root: Path, python2=True) -> Path:
    root.mkdir()
    dump = _python2_pickle if python2 else (lambda obj: pickle.dumps(obj, protocol=4))
    key = (lambda name: name.encode()) if python2 else str
    batches = {"data_batch_1": [0, 1, 2, 0], "data_batch_2": [1, 2, 0, 1], "test_batch": [2, 0]}
    for name, labels in batches.items():
        batch = {key("batch_label"): key(name), key("data"): _cifar_rows(labels), key("labels"): labels}
        (root / name).write_bytes(dump(batch))
    (root / "batches.meta").write_bytes(dump({key("label_names"): [key(n) for n in ("cat", "dog", "owl")]}))
    return root


@pytest.mark.parametrize("python2", [True, False], ids=["python2-pickles", "python3-pickles"])
def test_cifar10_batches_load_with_names_labels_and_channel_order(tmp_path, python2):
    root = _write_cifar10(tmp_path / "cifar-10-batches-py", python2)
    splits = load_data(f"cifar:{root}", input_size=SMALL, val_size=0)
    assert splits.classes == ["cat", "dog", "owl"]
    assert splits.train.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert splits.test.labels.tolist() == [2, 0]
    pixel = np.asarray(splits.test.pool.image(0))[5, 7]
    assert pixel.tolist() == [10, 20, 32]  # red, green, blue + label 2
    assert splits.test[0][0].shape == SMALL


def test_cifar100_uses_fine_labels(tmp_path):
    for name, fine in (("train", [3, 1, 4, 1, 0]), ("test", [2, 4])):
        batch = {"data": _cifar_rows(fine), "fine_labels": fine, "coarse_labels": [0] * len(fine)}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    names = ["apple", "bee", "cup", "dolphin", "elm"]
    (tmp_path / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": ["all"]}))
    splits = load_data(f"cifar:{tmp_path}", input_size=SMALL, val_size=0)
    assert splits.classes == names
    assert splits.train.labels.tolist() == [3, 1, 4, 1, 0] and splits.test.labels.tolist() == [2, 4]


class _ShellPayload:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_cifar_pickle_with_forbidden_global_is_refused_without_running_it(tmp_path):
    root = _write_cifar10(tmp_path / "cifar")
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps({"data": _ShellPayload(f"touch {marker}"), "labels": [0]}, protocol=2)
    (root / "data_batch_1").write_bytes(payload)
    with pytest.raises(UtuneError, match=r"refusing to load .*data_batch_1: it needs (posix|os)\.system"):
        load_data(f"cifar:{root}")
    assert not marker.exists()
    pickle.loads(payload)  # the ordinary unpickler does run it: the refusal above is what saved us
    assert marker.exists()


def test_cifar_file_that_is_not_a_batch_dict_is_refused(tmp_path):
    root = _write_cifar10(tmp_path / "cifar")
    (root / "data_batch_2").write_bytes(pickle.dumps([1, 2, 3]))
    expected = r"data_batch_2 is not a CIFAR python batch: expected a dict with data, labels, found list"
    with pytest.raises(UtuneError, match=expected):
        load_data(f"cifar:{root}")
    (root / "data_batch_2").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(UtuneError, match=r"expected a dict with data, labels, found \['data'\]"):
        load_data(f"cifar:{root}")


# --- npz -------------------------------------------------------------------------------


def test_npz_grayscale_arrays_become_three_equal_channels(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "gray.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
        y_train=np.arange(12) % 3,
        x_test=np.full((2, 8, 8), 255, np.uint8),
        y_test=np.array([2, 0]),
        classes=np.array(["a", "b", "c"]),
    )
    splits = load_data(f"npz:{path}", input_size=SMALL, data_config=PLAIN, val_size=3)
    assert splits.classes == ["a", "b", "c"] and (len(splits.train), len(splits.val)) == (9, 3)
    assert np.bincount(splits.val.labels).tolist() == [1, 1, 1]  # stratified
    image, label = splits.test[0]
    assert label == 2 and image.shape == SMALL
    assert torch.allclose(image, torch.ones_like(image))  # white, in all three channels


def test_npz_jpeg_pack_reads_bytes_offsets_and_labels(tmp_path):
    encoded, labels = [], [0, 1, 1, 0, 1, 0]
    for label in labels:
        stream = io.BytesIO()
        Image.new("RGB", (32, 32), (250, 5, 5) if label else (5, 5, 250)).save(stream, "JPEG", quality=95)
        encoded.append(np.frombuffer(stream.getvalue(), np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])])
    path = tmp_path / "pack.npz"
    np.savez(
        path,
        classes=np.array(["blue", "red"]),
        train_bytes=np.concatenate(encoded[:4]),
        train_offsets=offsets[:5],
        train_labels=np.array(labels[:4]),
        test_bytes=np.concatenate(encoded[4:]),
        test_offsets=offsets[4:] - offsets[4],
        test_labels=np.array(labels[4:]),
    )
    splits = load_data(f"npz:{path}", input_size=SMALL, data_config=PLAIN, val_size=0, augment=False)
    assert splits.classes == ["blue", "red"] and len(splits.train) == 4
    for image, label in [*splits.train, *splits.test]:
        red_wins = image[0].mean() > image[2].mean()
        assert red_wins == (label == 1)  # the label matches the bytes it was stored with


def test_npz_without_expected_keys_names_the_keys_found(tmp_path):
    path = tmp_path / "odd.npz"
    np.savez(path, images=np.zeros((2, 4, 4), np.uint8), targets=np.zeros(2))
    with pytest.raises(UtuneError, match=r"odd.npz has keys images, targets; expected x_train \+ y_train"):
        load_data(f"npz:{path}")


def test_npz_with_pickled_object_array_is_refused(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(
        path,
        x_train=np.zeros((2, 4, 4), np.uint8),
        y_train=np.zeros(2, np.int64),
        classes=np.array([{"a": 1}, None], dtype=object),
    )
    with pytest.raises(UtuneError, match=r"cannot read .*objects.npz as plain npz arrays"):
        load_data(f"npz:{path}")


@pytest.mark.skipif(not REAL_CIFAR.exists(), reason="shared CIFAR-10 pack not present")
def test_real_cifar10_jpeg_pack_gives_twenty_images():
    splits = load_data(f"npz:{REAL_CIFAR}", input_size=(3, 32, 32), train_size=20, val_size=0)
    assert len(splits.classes) == 10 and len(splits.test) == 10_000
    images, labels = zip(*splits.train)
    assert len(images) == 20 and all(image.shape == (3, 32, 32) for image in images)
    assert sorted(labels) == sorted(list(range(10)) * 2)  # 20 spread evenly: two per class


def test_classes_option_keeps_those_classes_relabelled_in_the_order_given(tmp_path):
    path = tmp_path / "ten.npz"
    pixels = np.arange(40, dtype=np.uint8)[:, None, None].repeat(4, 1).repeat(4, 2)  # image i is all value i
    np.savez(
        path,
        x_train=pixels[:30],
        y_train=np.arange(30) % 10,
        x_test=pixels[30:],
        y_test=np.arange(10),
        classes=np.array([f"c{i}" for i in range(10)]),
    )
    splits = load_data(
        f"npz:{path}?classes=7,c2,5",
        input_size=(3, 4, 4),
        val_size=0,
        augment=False,
        data_config={"mean": (0, 0, 0), "std": (1, 1, 1)},
    )
    assert splits.classes == ["c7", "c2", "c5"]
    originals = {round(float(image[0, 0, 0]) * 255) for image, _ in splits.train}
    assert originals == {2, 12, 22, 5, 15, 25, 7, 17, 27}
    assert all((round(float(image[0, 0, 0]) * 255) % 10) == [7, 2, 5][label] for image, label in splits.train)
    assert sorted(splits.test.labels) == [0, 1, 2] and splits.test.pool.describe(0).endswith("x_test[2]")
    digits = load_data("digits?classes=3,8", input_size=SMALL)
    assert digits.classes == ["3", "8"] and set(digits.train.labels) == {0, 1}
    for wanted, message in (
        (
            "7,dog",
            r"class 'dog' in data spec .* is neither a class name nor an index below 10; "
            r"the classes are c0, c1",
        ),
        ("7,c7", r"names a class twice in classes=7,c7; name each once"),
    ):
        with pytest.raises(UtuneError, match=message):
            load_data(f"npz:{path}?classes={wanted}")


@pytest.mark.skipif(not REAL_CIFAR.exists(), reason="shared CIFAR-10 pack not present")
def test_real_cifar10_classes_5_to_9_are_the_transfer_task():
    splits = load_data(f"npz:{REAL_CIFAR}?classes=5,6,7,8,9", input_size=(3, 32, 32), train_size=1000, val_size=0)
    assert splits.classes == ["dog", "frog", "horse", "ship", "truck"]
    assert (
        np.bincount(splits.train.labels).tolist() == [200] * 5
        and np.bincount(splits.test.labels).tolist() == [1000] * 5
    )


# --- digits and selection --------------------------------------------------------------


def test_digits_holds_out_a_fixed_stratified_test_split():
    first = load_data("digits", input_size=SMALL, seed=0)
    other = load_data("digits", input_size=SMALL, seed=1)
    assert len(first.train) + len(first.val) + len(first.test) == 1797
    assert len(first.test) == round(0.2 * 1797)
    assert np.bincount(first.test.labels).min() >= 35  # every class in proportion (~36 each)
    assert np.array_equal(first.test.indices, other.test.indices)  # the test split ignores the seed
    assert not np.array_equal(first.train.indices, other.train.indices)
    parts = [set(first.train.indices), set(first.val.indices), set(first.test.indices)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_shots_take_n_per_class_and_val_from_the_rest_repeatably():
    splits = load_data("digits", input_size=SMALL, shots=5, val_size=0.4, seed=3)
    again = load_data("digits", input_size=SMALL, shots=5, val_size=0.4, seed=3)
    assert np.bincount(splits.train.labels).tolist() == [5] * 10
    assert len(splits.val) == 20  # 0.4 of the 50 training images, drawn from the images left over
    assert not set(splits.val.indices) & set(splits.train.indices)
    assert not set(splits.val.indices) & set(splits.test.indices)
    assert np.array_equal(splits.train.indices, again.train.indices)
    assert np.array_equal(splits.val.indices, again.val.indices)
    wider = load_data("digits", input_size=SMALL, shots=5, val_size=0, seed=3)
    assert np.array_equal(wider.train.indices, splits.train.indices)  # val_size does not move train


def test_train_size_spreads_evenly_over_classes():
    splits = load_data("digits", input_size=SMALL, train_size=1003, val_size=100)
    counts = np.bincount(splits.train.labels)
    assert counts.sum() == 1003 and counts.max() - counts.min() == 1
    assert len(splits.val) == 100 and not set(splits.val.indices) & set(splits.train.indices)


def test_train_size_gives_small_classes_all_they_have_and_the_rest_to_others(tmp_path):
    root = _image_folder(tmp_path, {"rare": 2, "common": 10})
    splits = load_data(f"imagefolder:{root}", input_size=SMALL, train_size=8, val_size=0.25)
    assert np.bincount(splits.train.labels).tolist() == [6, 2]  # classes sort as common, rare
    assert splits.val.labels.tolist() == [0, 0]  # only 'common' has images left over


def test_val_is_carved_from_train_when_nothing_is_left_over(tmp_path):
    root = _image_folder(tmp_path, {"a": 3, "b": 3})
    splits = load_data(f"imagefolder:{root}", input_size=SMALL, shots=3, val_size=2)
    assert (len(splits.train), len(splits.val)) == (4, 2)
    assert not _selected_paths(splits.train) & _selected_paths(splits.val)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shots": 200}, r"class '0' has only \d+ training images, fewer than shots=200; lower --shots"),
        ({"shots": 2, "train_size": 10}, "give shots .* or train_size .*, not both"),
        ({"train_size": 5000}, r"train_size=5000 but the source has only 1438 training images"),
        ({"val_size": 1.5}, r"val_size must be a fraction in \[0, 1\) or a count >= 0, got 1.5"),
        ({"val_size": 1438}, r"val_size 1438 leaves no training images out of 1438"),
    ],
)
def test_impossible_selections_are_refused(kwargs, message):
    with pytest.raises(UtuneError, match=message):
        load_data("digits", input_size=SMALL, **kwargs)


# --- transforms ------------------------------------------------------------------------


def test_train_images_are_augmented_and_eval_images_are_not():
    splits = load_data("digits", input_size=SMALL, shots=2)
    torch.manual_seed(1)
    draws = [splits.train[0][0] for _ in range(4)]
    assert any(not torch.equal(draws[0], draw) for draw in draws[1:])
    assert torch.equal(splits.val[0][0], splits.val[0][0])
    plain = load_data("digits", input_size=SMALL, shots=2, augment=False)
    assert torch.equal(plain.train[0][0], plain.train[0][0])
    assert torch.equal(plain.train[0][0], plain.train.transform(plain.train.pool.image(int(plain.train.indices[0]))))


def test_data_config_sets_normalisation(tmp_path):
    path = tmp_path / "white.npz"
    np.savez(path, x_train=np.full((4, 8, 8, 3), 255, np.uint8), y_train=np.array([0, 1, 0, 1]))
    default = load_data(f"npz:{path}", input_size=SMALL, val_size=2).val[0][0]
    imagenet_white = [(1 - mean) / std for mean, std in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    assert torch.allclose(default[:, 0, 0], torch.tensor(imagenet_white))
    config = {"mean": (0.5,) * 3, "std": (0.25,) * 3}
    custom = load_data(f"npz:{path}", input_size=SMALL, val_size=2, data_config=config)
    assert torch.allclose(custom.val[0][0], torch.full(SMALL, 2.0))


# --- errors ----------------------------------------------------------------------------


def test_spec_and_folder_errors_say_what_to_do(tmp_path):
    schemes = "imagefolder:PATH, cifar:PATH, npz:PATH, digits"
    with pytest.raises(UtuneError, match=rf"unknown data spec 'tfds:mnist'; use one of {schemes}"):
        load_data("tfds:mnist")
    with pytest.raises(UtuneError, match=rf"data path {tmp_path}/nowhere .* does not exist"):
        load_data(f"cifar:{tmp_path}/nowhere")
    with pytest.raises(UtuneError, match=r"unknown option 'splits' .*options: classes=.*; split=FILE"):
        load_data(f"imagefolder:{tmp_path}?splits=x.txt")
    with pytest.raises(UtuneError, match=r"unknown option 'split' in data spec 'digits\?split=a'; options: classes="):
        load_data("digits?split=a")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(UtuneError, match=rf"no images found under {tmp_path} "):
        load_data(f"imagefolder:{tmp_path}")
    _write_image(tmp_path / "a" / "0.png", 1)
    with pytest.raises(UtuneError, match=rf"class folder {tmp_path}/b has no images; add images or remove the folder"):
        load_data(f"imagefolder:{tmp_path}")
    with pytest.raises(UtuneError, match=r"neither data_batch_1..5 \+ test_batch \(CIFAR-10\) nor train \+ test"):
        load_data(f"cifar:{tmp_path}")


def test_docs_name_every_scheme_and_admitted_pickle_global():
    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    names = [*SCHEMES, *(f"{module}.{name}" for module, name in CIFAR_PICKLE_GLOBALS)]
    assert [name for name in names if f"`{name}`" not in text] == []
