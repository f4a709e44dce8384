"""Dataset sources on the real bundled data (``data/``) and on real-format copies written to tmp_path."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from robustft.data import DATASET_SOURCES, DataConfigError, DatasetSpec, LabeledImages, load_dataset

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
JPEG_5K = DATA / "cifar10" / "cifar10_train_5k_jpeg.npz"
TEST_2K = DATA / "cifar10" / "cifar10_test_2k.npz"
PNG_200 = DATA / "cifar10" / "cifar10_kaggle_train200_png.npz"
MNIST = DATA / "mnist"

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load(source: str, path: Path | str, field: str = "data.train", **kwargs) -> LabeledImages:
    return load_dataset(DatasetSpec(source=source, path=str(path), **kwargs), field)


def pixels(dataset: LabeledImages, index: int) -> np.ndarray:
    image, _ = dataset[index]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    return np.asarray(image)


@pytest.fixture(scope="module")
def png200() -> dict[str, np.ndarray]:
    with np.load(PNG_200) as arrays:
        return {k: arrays[k] for k in arrays.files}


@pytest.fixture(scope="module")
def jpeg5k() -> LabeledImages:
    return load("npz", JPEG_5K)


# ------------------------------------------------------------------------------------------------ npz
def test_npz_jpeg_bytes_bundled_train_set(jpeg5k: LabeledImages) -> None:
    assert len(jpeg5k) == 5000
    assert jpeg5k.class_names == CIFAR10_NAMES
    assert np.bincount(jpeg5k.labels, minlength=10).tolist() == [500] * 10
    image, label = jpeg5k[0]
    assert image.mode == "RGB" and image.size == (32, 32)
    assert isinstance(label, int)
    with np.load(JPEG_5K) as arrays:
        blob, offsets, labels = arrays["jpeg_bytes"], arrays["offsets"], arrays["labels"]
    np.testing.assert_array_equal(jpeg5k.labels, labels)
    for i in (0, 1, 777, 2500, 4999):
        raw = blob[offsets[i] : offsets[i + 1]].tobytes()
        with Image.open(io.BytesIO(raw)) as reference:
            assert reference.format == "JPEG"
            expected = np.asarray(reference.convert("RGB"))
        np.testing.assert_array_equal(pixels(jpeg5k, i), expected)


def test_npz_images_round_trip_and_default_class_names(tmp_path: Path, png200: dict) -> None:
    images, labels = png200["images"][:20], png200["labels"][:20]
    with_names = tmp_path / "named.npz"
    np.savez(with_names, images=images, labels=labels, class_names=png200["class_names"])
    dataset = load("npz", with_names)
    assert len(dataset) == 20 and dataset.class_names == CIFAR10_NAMES
    for i in range(20):
        np.testing.assert_array_equal(pixels(dataset, i), images[i])
        assert dataset[i][1] == int(labels[i])

    without_names = tmp_path / "plain.npz"
    np.savez(without_names, images=images, labels=labels)
    assert load("npz", without_names).class_names == [str(i) for i in range(int(labels.max()) + 1)]


def test_npz_grayscale_images_become_rgb(tmp_path: Path) -> None:
    gray = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    path = tmp_path / "gray.npz"
    np.savez(path, images=gray, labels=np.array([0, 1]))
    rgb = pixels(load("npz", path), 1)
    assert rgb.shape == (8, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray[1])


def test_npz_without_expected_keys(tmp_path: Path, png200: dict) -> None:
    path = tmp_path / "wrong.npz"
    np.savez(path, pictures=png200["images"][:2], labels=png200["labels"][:2])
    with pytest.raises(DataConfigError) as info:
        load("npz", path, field="data.test")
    message = str(info.value)
    assert (
        "data.test.path" in message
        and "pictures" in message
        and "images" in message
        and "jpeg_bytes" in message
    )

    no_labels = tmp_path / "nolabels.npz"
    np.savez(no_labels, images=png200["images"][:2])
    with pytest.raises(DataConfigError, match="labels"):
        load("npz", no_labels)

    only_blob = tmp_path / "blob.npz"  # jpeg_bytes without offsets
    np.savez(only_blob, jpeg_bytes=np.zeros(10, np.uint8), labels=np.zeros(1, np.int64))
    with pytest.raises(DataConfigError, match="offsets"):
        load("npz", only_blob)


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ((4, 3, 8, 8), r"looks channels-first \(N, C, H, W\).*images\.transpose\(0, 2, 3, 1\)"),
        ((4, 1, 8, 8), r"looks channels-first"),
        ((4, 8, 8, 4), r"4 channels \(RGBA\?\); keep RGB: images\[\.\.\., :3\]"),
        ((4, 192), r"must have shape \(N, H, W\) or \(N, H, W, C\) with C 1 or 3, got \(4, 192\)"),
    ],
)
def test_npz_image_layout_checked_at_load(tmp_path: Path, shape: tuple[int, ...], pattern: str) -> None:
    """A wrong layout used to load fine and crash in PIL at the first batch."""
    path = save_npz(tmp_path / "x.npz", images=np.zeros(shape, np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(
        DataConfigError, match=rf"^data\.ood\.far\.dtd: in '{re.escape(str(path))}', images .*{pattern}"
    ):
        load("npz", path, field="data.ood.far.dtd")


@pytest.mark.parametrize(
    ("images", "labels", "pattern"),
    [
        (
            np.zeros((4, 8, 8, 3), np.float32),
            np.zeros(4, np.int64),
            r"images must be uint8 \(0\.\.255\), got dtype float32",
        ),
        (
            np.zeros((4, 8, 8, 3), np.uint8),
            np.zeros(3, np.int64),
            r"4 images but 3 labels; give exactly one label per image",
        ),
        (
            np.zeros((4, 8, 8, 3), np.uint8),
            np.eye(4, dtype=np.int64),
            r"labels must be 1-D .*got shape \(4, 4\)",
        ),
        (
            np.zeros((4, 8, 8, 3), np.uint8),
            np.array(["a", "b", "a", "b"]),
            r"labels must be integer class ids, got dtype <U1",
        ),
    ],
)
def test_npz_array_errors_name_field_and_file(
    tmp_path: Path, images: np.ndarray, labels: np.ndarray, pattern: str
) -> None:
    path = save_npz(tmp_path / "bad.npz", images=images, labels=labels)
    with pytest.raises(DataConfigError, match=rf"^data\.test: in '{re.escape(str(path))}', {pattern}"):
        load("npz", path, field="data.test")


def test_npz_float_labels_must_be_whole_numbers(tmp_path: Path) -> None:
    """Float labels used to be truncated (1.5 -> 1); whole-number floats are still accepted."""
    images = np.zeros((3, 8, 8, 3), np.uint8)
    path = save_npz(tmp_path / "frac.npz", images=images, labels=np.array([0.0, 1.5, 2.0]))
    with pytest.raises(DataConfigError) as info:
        load("npz", path, field="data.train")
    message = str(info.value)
    assert message.startswith(f"data.train: in '{path}', labels must be integer class ids, got dtype float64")
    assert "1.5" in message and "accepted only when every value is a whole number" in message
    nan = save_npz(tmp_path / "nan.npz", images=images, labels=np.array([0.0, np.nan, 2.0]))
    with pytest.raises(DataConfigError, match="labels must be integer class ids"):
        load("npz", nan)
    whole = save_npz(tmp_path / "whole.npz", images=images, labels=np.array([0.0, 2.0, 1.0], np.float32))
    dataset = load("npz", whole)
    assert dataset.labels.dtype == np.int64 and dataset.labels.tolist() == [0, 2, 1]
    assert dataset.class_names == ["0", "1", "2"]


@pytest.mark.parametrize("max_samples", [0, -5])
def test_max_samples_below_one_refused_before_loading(tmp_path: Path, max_samples: int) -> None:
    with pytest.raises(
        DataConfigError, match=rf"^data\.ood\.far\.x\.max_samples: must be >= 1 .*got {max_samples}$"
    ):
        load("npz", TEST_2K, field="data.ood.far.x", max_samples=max_samples)
    # refused before any file is read: a missing path is not reported first
    with pytest.raises(DataConfigError, match=r"\.max_samples: must be >= 1"):
        load("npz", tmp_path / "missing.npz", max_samples=max_samples)


def test_npz_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"this is not a numpy archive at all")
    with pytest.raises(DataConfigError, match=r"data\.train\.path: cannot read"):
        load("npz", path)


# ------------------------------------------------------------------------------------ CIFAR pickles
# The real ``cifar-10-batches-py`` files are Python 2 pickles: dict keys and label names are 8-bit
# strings, which ``pickle.load(f, encoding="bytes")`` returns as b'data', b'labels', b'label_names' and
# which torchvision (``encoding="latin1"``) reads as 'data', 'labels', 'label_names'. The writer below
# emits exactly that (SHORT_BINSTRING opcodes), with each value pickled by the standard pickler.


def _py2_str(text: str) -> bytes:
    raw = text.encode("latin1")
    assert len(raw) < 256
    return b"U" + bytes([len(raw)]) + raw  # SHORT_BINSTRING: a Python 2 ``str``


def _py2_value(value) -> bytes:
    if isinstance(value, str):
        return _py2_str(value)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return b"]" + b"(" + b"".join(_py2_str(v) for v in value) + b"e"  # EMPTY_LIST MARK ... APPENDS
    body = pickle.dumps(value, protocol=2)
    assert body[:2] == b"\x80\x02" and body[-1:] == b"."
    return body[2:-1]  # without PROTO and STOP; memo indices may be reused, which the unpickler allows


def write_py2_pickle(path: Path, mapping: dict) -> None:
    out = b"\x80\x02}"  # PROTO 2, EMPTY_DICT
    for key, value in mapping.items():
        out += _py2_str(key) + _py2_value(value) + b"s"  # SETITEM
    path.write_bytes(out + b".")


CIFAR_BATCHES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


def write_cifar10(
    root: Path, images: np.ndarray, labels: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write ``root/cifar-10-batches-py`` with 4 real images per batch; return what each batch holds."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    held = {}
    for b, name in enumerate(CIFAR_BATCHES):
        batch_images = images[4 * b : 4 * b + 4]
        batch_labels = labels[4 * b : 4 * b + 4]
        held[name] = (batch_images, batch_labels)
        write_py2_pickle(
            folder / name,
            {
                "batch_label": f"{name} of 6",
                # CIFAR rows: 1024 red, then 1024 green, then 1024 blue values, each row-major
                "data": batch_images.transpose(0, 3, 1, 2).reshape(len(batch_images), 3072).copy(),
                "labels": [int(v) for v in batch_labels],
                "filenames": [f"img_{name}_{i}.png" for i in range(len(batch_images))],
            },
        )
    write_py2_pickle(
        folder / "batches.meta",
        {"num_cases_per_batch": 4, "label_names": CIFAR10_NAMES, "num_vis": 3072},
    )
    return held


@pytest.fixture
def cifar_root(tmp_path: Path, png200: dict, monkeypatch: pytest.MonkeyPatch):
    """A real-format CIFAR-10 folder from the lossless bundled images.

    torchvision's ``CIFAR10._check_integrity`` (and ``_load_meta``) compare every file's md5 with the
    checksums of the official files (class attributes ``train_list``, ``test_list``, ``meta``) and refuse
    anything else with "Dataset not found or corrupted". The test keeps that check running but points it
    at the md5 sums of the files it wrote, by monkeypatching those class attributes.
    """
    from torchvision.datasets import CIFAR10

    root = tmp_path / "cifar"
    held = write_cifar10(root, png200["images"], png200["labels"])
    folder = root / "cifar-10-batches-py"

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(n)] for n in CIFAR_BATCHES[:5]])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5("batches.meta")})
    return root, held


def test_cifar_writer_matches_the_python2_layout(cifar_root) -> None:
    root, held = cifar_root
    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert set(entry) == {b"batch_label", b"data", b"labels", b"filenames"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (4, 3072)
    with open(root / "cifar-10-batches-py" / "batches.meta", "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    assert meta[b"label_names"][:2] == [b"airplane", b"automobile"]


@pytest.mark.parametrize("as_batches_folder", [False, True])
def test_cifar10_pickles_round_trip(cifar_root, as_batches_folder: bool) -> None:
    root, held = cifar_root
    path = root / "cifar-10-batches-py" if as_batches_folder else root
    train = load("cifar10", path, split="train")
    test = load("cifar10", path, split="test", field="data.test")
    assert train.class_names == CIFAR10_NAMES and test.class_names == CIFAR10_NAMES
    train_images = np.concatenate([held[n][0] for n in CIFAR_BATCHES[:5]])
    train_labels = np.concatenate([held[n][1] for n in CIFAR_BATCHES[:5]])
    assert len(train) == 20 and len(test) == 4
    np.testing.assert_array_equal(train.labels, train_labels)
    np.testing.assert_array_equal(test.labels, held["test_batch"][1])
    for i in range(len(train)):
        np.testing.assert_array_equal(pixels(train, i), train_images[i])
    for i in range(len(test)):
        np.testing.assert_array_equal(pixels(test, i), held["test_batch"][0][i])


def test_cifar10_torchvision_refuses_wrong_md5(tmp_path: Path, png200: dict) -> None:
    """Without the checksum patch torchvision refuses files that are not the official ones; the
    source turns its RuntimeError into a config error naming the field."""
    write_cifar10(tmp_path, png200["images"], png200["labels"])
    with pytest.raises(DataConfigError) as info:
        load("cifar10", tmp_path, split="train", field="data.train")
    message = str(info.value)
    assert "data.train.path" in message and "md5" in message and "corrupted" in message


def test_cifar10_incomplete_folder(cifar_root) -> None:
    root, _ = cifar_root
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataConfigError, match=r"data\.test\.path: the files in .* are incomplete"):
        load("cifar10", root, split="test", field="data.test")


def test_cifar10_bad_split(cifar_root) -> None:
    root, _ = cifar_root
    with pytest.raises(DataConfigError, match=r"data\.train\.split"):
        load("cifar10", root, split="val")


@pytest.mark.parametrize(
    "source, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_cifar_missing_folder(tmp_path: Path, source: str, folder: str) -> None:
    with pytest.raises(DataConfigError) as info:
        load(source, tmp_path / "nowhere", field="data.ood.near.c100")
    message = str(info.value)
    assert "data.ood.near.c100.path" in message
    assert folder in message
    assert "data.ood.near.c100.download: true" in message


# ------------------------------------------------------------------------------------------- MNIST
MNIST_FIRST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


@pytest.fixture(scope="module")
def mnist() -> LabeledImages:
    return load("mnist", MNIST, split="test")


def test_mnist_bundled_idx(mnist: LabeledImages) -> None:
    assert len(mnist) == 2000
    assert mnist.labels[:10].tolist() == MNIST_FIRST_LABELS
    assert mnist.class_names == [str(i) for i in range(10)]
    image, label = mnist[0]
    assert image.mode == "RGB" and image.size == (28, 28) and label == 7
    rgb = np.asarray(image)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    # the raw IDX bytes of image 0, read independently
    with gzip.open(MNIST / "t10k-images-idx3-ubyte.gz", "rb") as f:
        header = f.read(16)
        first = np.frombuffer(f.read(28 * 28), dtype=np.uint8).reshape(28, 28)
    assert struct.unpack(">IIII", header) == (0x803, 2000, 28, 28)
    np.testing.assert_array_equal(rgb[..., 0], first)


def _ungzip(src: Path, dst: Path) -> None:
    with gzip.open(src, "rb") as f:
        dst.write_bytes(f.read())


@pytest.mark.parametrize("layout", ["plain", "MNIST/raw", "MNIST/raw gz"])
def test_mnist_layouts(tmp_path: Path, mnist: LabeledImages, layout: str) -> None:
    folder = tmp_path / "MNIST" / "raw" if layout.startswith("MNIST/raw") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        if layout.endswith("gz"):
            shutil.copy(MNIST / f"{name}.gz", folder / f"{name}.gz")
        else:
            _ungzip(MNIST / f"{name}.gz", folder / name)
    dataset = load("mnist", tmp_path, split="test")
    assert len(dataset) == 2000
    np.testing.assert_array_equal(dataset.labels, mnist.labels)
    for i in (0, 1999):
        np.testing.assert_array_equal(pixels(dataset, i), pixels(mnist, i))


def test_mnist_missing_split_files(tmp_path: Path) -> None:
    with pytest.raises(DataConfigError) as info:
        load("mnist", MNIST, split="train", field="data.ood.far.mnist")
    assert "data.ood.far.mnist.path" in str(info.value) and "train-images-idx3-ubyte" in str(info.value)
    with pytest.raises(DataConfigError, match="t10k-images-idx3-ubyte"):
        load("mnist", tmp_path, split="test")


def test_mnist_rejects_non_ubyte_idx(tmp_path: Path) -> None:
    # an IDX file of int32 (type code 0x0C) is not an image file this source can read
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">HBBIII", 0, 0x0C, 3, 1, 1, 1) + b"\0" * 4)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">HBBI", 0, 0x08, 1, 1) + b"\0")
    with pytest.raises(ValueError, match="unsigned-byte IDX"):
        load("mnist", tmp_path)
    # the error is a config error that names the field and the folder
    with pytest.raises(
        DataConfigError, match=r"^data\.ood\.far\.mnist: in '.*', 't10k-images-idx3-ubyte' is not"
    ):
        load("mnist", tmp_path, field="data.ood.far.mnist")


# ------------------------------------------------------------------------------------ image folders
def test_folder_with_class_subfolders(tmp_path: Path, png200: dict) -> None:
    images, labels, names = png200["images"], png200["labels"], [str(c) for c in png200["class_names"]]
    chosen = {"cat": [], "airplane": [], "ship": []}
    for i in range(len(labels)):
        name = names[labels[i]]
        if name in chosen and len(chosen[name]) < 3:
            chosen[name].append(i)
    for name, indices in chosen.items():
        (tmp_path / name / "nested").mkdir(parents=True)
        for j, i in enumerate(indices):
            where = tmp_path / name / ("nested" if j == 2 else "") / f"{j}.png"
            Image.fromarray(images[i]).save(where)
        (tmp_path / name / "notes.txt").write_text("not an image")
    dataset = load("folder", tmp_path)
    assert dataset.class_names == ["airplane", "cat", "ship"]  # sorted folder names give the label ids
    assert len(dataset) == 9
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for position, (_name, indices) in enumerate(sorted(chosen.items())):
        got = [pixels(dataset, 3 * position + j) for j in range(3)]
        expected = [images[i] for i in indices]
        # lossless PNG: each image comes back exactly (the order inside a class is by file path)
        for e in expected:
            assert any(np.array_equal(g, e) for g in got)


def test_flat_folder_is_unlabeled(tmp_path: Path, png200: dict) -> None:
    for i in range(5):
        Image.fromarray(png200["images"][i]).save(tmp_path / f"img{i}.png")
    Image.fromarray(png200["images"][5]).convert("L").save(tmp_path / "gray.JPG")
    (tmp_path / "readme.md").write_text("ignored")
    dataset = load("folder", tmp_path)
    assert dataset.class_names == ["unlabeled"]
    assert len(dataset) == 6 and dataset.labels.tolist() == [0] * 6
    assert pixels(dataset, 0).shape == (32, 32, 3)  # gray.JPG sorts first and is converted to RGB
    np.testing.assert_array_equal(pixels(dataset, 1), png200["images"][0])


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataConfigError, match=r"data\.ood\.far\.x: the dataset at .* is empty"):
        load("folder", tmp_path, field="data.ood.far.x")


# ----------------------------------------------------------------------- class filter and subsets
def test_exclude_classes() -> None:
    full = load("npz", TEST_2K)
    kept = load("npz", TEST_2K, exclude_classes=[0, 3, 9])
    assert len(kept) == 1400
    assert not np.isin(kept.labels, [0, 3, 9]).any()
    assert kept.class_names == full.class_names  # label ids keep their meaning
    first_kept = int(np.flatnonzero(~np.isin(full.labels, [0, 3, 9]))[0])
    np.testing.assert_array_equal(pixels(kept, 0), pixels(full, first_kept))


def test_max_samples_is_a_seeded_subset() -> None:
    full = load("npz", TEST_2K)
    a = load("npz", TEST_2K, max_samples=100, seed=1)
    b = load("npz", TEST_2K, max_samples=100, seed=1)
    c = load("npz", TEST_2K, max_samples=100, seed=2)
    assert len(a) == len(c) == 100
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    # every subset image is a real image of the full set, kept in source order
    flat_full = full.images.reshape(len(full), -1)
    rows = [int(np.flatnonzero((flat_full == img.reshape(-1)).all(axis=1))[0]) for img in a.images[:10]]
    assert rows == sorted(rows)
    # more samples than the set holds: the whole set
    assert len(load("npz", TEST_2K, max_samples=10_000)) == 2000


def test_max_samples_after_exclude_classes() -> None:
    subset = load("npz", TEST_2K, exclude_classes=list(range(5)), max_samples=50, seed=0)
    assert len(subset) == 50 and subset.labels.min() >= 5


def test_empty_after_exclude_classes() -> None:
    with pytest.raises(DataConfigError) as info:
        load("npz", TEST_2K, exclude_classes=list(range(10)), field="data.ood.near.tin")
    message = str(info.value)
    assert (
        "data.ood.near.tin" in message
        and "empty after exclude_classes" in message
        and str(TEST_2K) in message
    )


def test_spec_given_as_dict() -> None:
    dataset = load_dataset({"source": "npz", "path": str(TEST_2K), "max_samples": 7}, "data.test")
    assert len(dataset) == 7


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("source", ["npz", "mnist", "folder"])
def test_missing_path_names_field_and_path(tmp_path: Path, source: str) -> None:
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(DataConfigError) as info:
        load(source, missing, field="data.train")
    assert "data.train.path" in str(info.value) and str(missing) in str(info.value)


def test_unknown_source_names_close_matches() -> None:
    with pytest.raises(DataConfigError) as info:
        load("npzz", TEST_2K, field="data.train")
    message = str(info.value)
    assert "data.train.source" in message and "'npzz'" in message and "Did you mean 'npz'" in message
    with pytest.raises(DataConfigError, match="cifar10"):
        load("cifar", TEST_2K)


def test_registered_sources() -> None:
    assert {"npz", "cifar10", "cifar100", "mnist", "folder"} <= set(DATASET_SOURCES.names())
