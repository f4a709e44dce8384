"""Dataset sources: where images come from, independent of how they are transformed or batched.

Every source yields the same thing: a :class:`LabeledImages` dataset whose items are ``(PIL image,
int label)`` and which knows its ``class_names``. Sources are registered by name so a YAML file says
``source: npz`` and ``path: ...``; the datamodule never special-cases a format. Nothing downloads
unless the user sets ``download: true``.
"""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from robustft.registry import Registry


class DataConfigError(ValueError):
    """A dataset entry of the config is wrong; the message names the field and the fix."""


@dataclass
class DatasetSpec:
    """One dataset as written in YAML.

    Attributes:
        source: registered source name (``npz``, ``cifar10``, ``cifar100``, ``mnist``, ``folder``, ...).
        path: file or directory the source reads.
        split: ``train`` or ``test`` for sources that hold both (CIFAR pickles, MNIST IDX files).
        download: let torchvision download CIFAR when ``path`` has no copy (online users only).
        max_samples: keep a seeded random subset of this size (after class filtering).
        exclude_classes: label ids to drop (e.g. TinyImageNet classes that overlap the ID classes).
        seed: seed of the ``max_samples`` subset.
    """

    source: str
    path: str
    split: str = "test"
    download: bool = False
    max_samples: int | None = None
    exclude_classes: list[int] = field(default_factory=list)
    seed: int = 0


class LabeledImages(Dataset):
    """Base dataset: ``(PIL RGB image, label)`` items plus ``labels`` and ``class_names``."""

    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def load_image(self, index: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load_image(index), int(self.labels[index])


class ArrayImages(LabeledImages):
    """Images held in memory as a uint8 array (N, H, W, C) or (N, H, W)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> None:
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 NHWC, got dtype {images.dtype} shape {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = [str(c) for c in class_names]

    def load_image(self, index: int) -> Image.Image:
        array = self.images[index]
        if array.shape[-1] == 1:
            return Image.fromarray(array[..., 0], mode="L").convert("RGB")
        return Image.fromarray(array, mode="RGB")

    def subset(self, indices: np.ndarray) -> ArrayImages:
        return ArrayImages(self.images[indices], self.labels[indices], self.class_names)


class FileImages(LabeledImages):
    """Images read lazily from files (image folders): too many to hold in memory."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, class_names: Sequence[str]) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)

    def load_image(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB")

    def subset(self, indices: np.ndarray) -> FileImages:
        return FileImages([self.paths[i] for i in indices], self.labels[indices], self.class_names)


SourceFn = Callable[[DatasetSpec, str], LabeledImages]
DATASET_SOURCES: Registry[SourceFn] = Registry("dataset source")


def _require_path(path: Path, field_name: str, hint: str) -> Path:
    if not path.exists():
        raise DataConfigError(f"{field_name}.path: '{path}' does not exist. {hint}")
    return path


def _decode_jpeg_blob(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Decode concatenated JPEG files once, so training epochs do not pay for decoding."""
    first = np.asarray(Image.open(io.BytesIO(blob[offsets[0] : offsets[1]].tobytes())).convert("RGB"))
    out = np.empty((len(offsets) - 1, *first.shape), dtype=np.uint8)
    for i in range(len(offsets) - 1):
        with Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())) as image:
            out[i] = np.asarray(image.convert("RGB"))
    return out


@DATASET_SOURCES.register("npz")
def load_npz(spec: DatasetSpec, field_name: str) -> LabeledImages:
    """Compact ``.npz`` arrays: ``images`` (NHWC uint8) or ``jpeg_bytes`` + ``offsets``, with
    ``labels`` and optionally ``class_names``. Loaded with ``allow_pickle=False``."""
    path = _require_path(Path(spec.path), field_name, "Give the path of an .npz file with 'images' and 'labels'.")
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for a bad file
        raise DataConfigError(f"{field_name}.path: cannot read '{path}' as .npz ({exc})") from exc
    keys = set(arrays.files)
    if "labels" not in keys or not ({"images"} <= keys or {"jpeg_bytes", "offsets"} <= keys):
        raise DataConfigError(
            f"{field_name}.path: '{path}' has keys {sorted(keys)}; expected 'labels' and either 'images' "
            "(NHWC uint8) or 'jpeg_bytes' + 'offsets'"
        )
    labels = arrays["labels"]
    if "images" in keys:
        images = arrays["images"]
    else:
        images = _decode_jpeg_blob(arrays["jpeg_bytes"], arrays["offsets"])
    if "class_names" in keys:
        class_names = [str(c) for c in arrays["class_names"]]
    else:
        class_names = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    return ArrayImages(images, labels, class_names)


def _load_cifar(spec: DatasetSpec, field_name: str, dataset_cls: type, folder: str) -> LabeledImages:
    root = Path(spec.path)
    if root.name == folder:  # accept the batches folder itself as well as its parent
        root = root.parent
    if not (root / folder).exists() and not spec.download:
        raise DataConfigError(
            f"{field_name}.path: no '{folder}' folder under '{root}'. Point path at the folder that "
            f"contains '{folder}' (the standard python-pickle layout), or set {field_name}.download: true "
            "on a machine with internet access."
        )
    if spec.split not in ("train", "test"):
        raise DataConfigError(f"{field_name}.split: must be 'train' or 'test', got '{spec.split}'")
    try:
        dataset = dataset_cls(str(root), train=spec.split == "train", download=spec.download)
    except RuntimeError as exc:  # torchvision: a batch file missing or not matching the official md5
        raise DataConfigError(
            f"{field_name}.path: the files in '{root / folder}' are incomplete or not the official ones "
            f"(torchvision checks each file's md5): {exc}. Copy the complete folder again, or set "
            f"{field_name}.download: true on a machine with internet access."
        ) from exc
    return ArrayImages(np.asarray(dataset.data), np.asarray(dataset.targets), dataset.classes)


@DATASET_SOURCES.register("cifar10")
def load_cifar10(spec: DatasetSpec, field_name: str) -> LabeledImages:
    """CIFAR-10 in the standard python-pickle layout (``cifar-10-batches-py/``)."""
    from torchvision.datasets import CIFAR10

    return _load_cifar(spec, field_name, CIFAR10, "cifar-10-batches-py")


@DATASET_SOURCES.register("cifar100")
def load_cifar100(spec: DatasetSpec, field_name: str) -> LabeledImages:
    """CIFAR-100 in the standard python-pickle layout (``cifar-100-python/``)."""
    from torchvision.datasets import CIFAR100

    return _load_cifar(spec, field_name, CIFAR100, "cifar-100-python")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"'{path}' is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@DATASET_SOURCES.register("mnist")
def load_mnist(spec: DatasetSpec, field_name: str) -> LabeledImages:
    """MNIST (or Fashion-MNIST) IDX files, gzipped or not, in ``path`` or ``path/MNIST/raw``."""
    prefix = "train" if spec.split == "train" else "t10k"
    root = _require_path(Path(spec.path), field_name, "Give the folder holding the MNIST IDX files.")
    for folder in (root, root / "MNIST" / "raw"):
        for suffix in (".gz", ""):
            images = folder / f"{prefix}-images-idx3-ubyte{suffix}"
            labels = folder / f"{prefix}-labels-idx1-ubyte{suffix}"
            if images.exists() and labels.exists():
                return ArrayImages(_read_idx(images), _read_idx(labels).astype(np.int64), [str(i) for i in range(10)])
    raise DataConfigError(
        f"{field_name}.path: no '{prefix}-images-idx3-ubyte[.gz]' and '{prefix}-labels-idx1-ubyte[.gz]' "
        f"in '{root}' or '{root / 'MNIST' / 'raw'}'"
    )


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@DATASET_SOURCES.register("folder")
def load_folder(spec: DatasetSpec, field_name: str) -> LabeledImages:
    """An image folder: one sub-folder per class (sorted names give label ids), or a flat folder of
    unlabeled images (label 0, e.g. an OOD set)."""
    root = _require_path(Path(spec.path), field_name, "Give a folder of class sub-folders or of images.")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    paths: list[str] = []
    labels: list[int] = []
    if class_dirs:
        for label, class_dir in enumerate(class_dirs):
            files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            paths += [str(p) for p in files]
            labels += [label] * len(files)
        class_names = [p.name for p in class_dirs]
    else:
        paths = sorted(str(p) for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        labels = [0] * len(paths)
        class_names = ["unlabeled"]
    return FileImages(paths, np.asarray(labels, dtype=np.int64), class_names)


def load_dataset(spec: DatasetSpec, field_name: str) -> LabeledImages:
    """Build the dataset a spec describes, apply its class filter and subset, refuse empty results."""
    if not isinstance(spec, DatasetSpec):
        spec = DatasetSpec(**spec)
    try:
        source = DATASET_SOURCES.get(spec.source)
    except KeyError as exc:
        raise DataConfigError(f"{field_name}.source: {exc.args[0]}") from None
    dataset = source(spec, field_name)
    keep = np.arange(len(dataset))
    if spec.exclude_classes:
        keep = keep[~np.isin(dataset.labels, spec.exclude_classes)]
    if spec.max_samples is not None and spec.max_samples < len(keep):
        rng = np.random.default_rng(spec.seed)
        keep = np.sort(rng.choice(keep, size=spec.max_samples, replace=False))
    if len(keep) == 0:
        raise DataConfigError(
            f"{field_name}: the dataset at '{spec.path}' is empty"
            + (" after exclude_classes/max_samples" if len(dataset) else "")
            + ". Point it at a dataset with images."
        )
    if len(keep) < len(dataset):
        dataset = dataset.subset(keep)
    return dataset
