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


class ArrayFormatError(ValueError):
    """An images or labels array has the wrong dtype or shape.

    Raised where the arrays are checked (:class:`ArrayImages`, used by several sources), which does not
    know the config field or the file; :func:`load_dataset` re-raises it as a :class:`DataConfigError`
    that names both.
    """


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
    """Base dataset: ``(PIL RGB image, label)`` items plus ``labels`` and ``class_names``.

    A source whose samples come with captions (an npz ``texts`` array, webdataset ``.txt`` members) sets
    ``texts`` (one string per sample); the datamodule then puts them in the batch as ``text``.
    """

    labels: np.ndarray
    class_names: list[str]
    texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def load_image(self, index: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load_image(index), int(self.labels[index])


def as_image_array(images: np.ndarray) -> np.ndarray:
    """``images`` as uint8 (N, H, W, C) with C 1 or 3, or :class:`ArrayFormatError` saying the fix.

    Checked when a set is loaded because PIL only fails on a wrong layout when an image is first
    drawn, i.e. at the first training or evaluation batch, far from the config entry at fault.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ArrayFormatError(
            f"images must be uint8 (0..255), got dtype {images.dtype}; convert them before saving, "
            "e.g. (images * 255).round().astype(np.uint8) for floats in [0, 1]"
        )
    if images.ndim == 3:  # grayscale (N, H, W)
        return images[..., None]
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return images
    if images.ndim == 4 and images.shape[1] in (1, 3, 4):
        raise ArrayFormatError(
            f"images have shape {images.shape}, which looks channels-first (N, C, H, W); store them "
            "channels-last (N, H, W, C): images.transpose(0, 2, 3, 1)"
        )
    if images.ndim == 4 and images.shape[-1] == 4:
        raise ArrayFormatError(
            f"images have shape {images.shape}: 4 channels (RGBA?); keep RGB: images[..., :3]"
        )
    raise ArrayFormatError(
        f"images must have shape (N, H, W) or (N, H, W, C) with C 1 or 3, got {images.shape}"
    )


def as_label_array(labels: np.ndarray) -> np.ndarray:
    """``labels`` as 1-D int64 class ids, or :class:`ArrayFormatError` saying the fix.

    Integer dtypes are taken as they are. Float labels are accepted only when every value is a whole
    number (then cast, losslessly); any other value (1.5, NaN) would be silently truncated by a cast,
    so it is refused. Strings, booleans and other dtypes are refused.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ArrayFormatError(
            f"labels must be 1-D (one class id per image), got shape {labels.shape}; "
            "for one-hot labels save labels.argmax(1)"
        )
    if labels.dtype.kind in "iu":
        return labels.astype(np.int64, copy=False)
    if labels.dtype.kind == "f":
        fractional = ~np.isfinite(labels) | (labels != np.round(labels))
        if not fractional.any():
            return labels.astype(np.int64)
        raise ArrayFormatError(
            f"labels must be integer class ids, got dtype {labels.dtype} with value "
            f"{labels[np.argmax(fractional)].item()!r} (float labels are accepted only when every value is a whole "
            "number); save the class ids as an integer array"
        )
    raise ArrayFormatError(
        f"labels must be integer class ids, got dtype {labels.dtype}; save the ids 0..K-1 as an integer "
        "array (and the names, for an npz file, as class_names)"
    )


class ArrayImages(LabeledImages):
    """Images held in memory as a uint8 array (N, H, W, C) or (N, H, W).

    Raises:
        ArrayFormatError: wrong image dtype or layout, labels that are not integer class ids, or a
            different number of images and labels.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], texts: Sequence[str] | None = None
    ) -> None:
        images = as_image_array(images)
        labels = as_label_array(labels)
        if len(images) != len(labels):
            raise ArrayFormatError(
                f"{len(images)} images but {len(labels)} labels; give exactly one label per image"
            )
        if texts is not None and len(texts) != len(images):
            raise ArrayFormatError(f"{len(images)} images but {len(texts)} texts; give exactly one caption per image")
        self.images = images
        self.labels = labels
        self.class_names = [str(c) for c in class_names]
        self.texts = [str(t) for t in texts] if texts is not None else None

    def load_image(self, index: int) -> Image.Image:
        array = self.images[index]
        if array.shape[-1] == 1:
            return Image.fromarray(array[..., 0], mode="L").convert("RGB")
        return Image.fromarray(array, mode="RGB")

    def subset(self, indices: np.ndarray) -> ArrayImages:
        texts = [self.texts[i] for i in indices] if self.texts is not None else None
        return ArrayImages(self.images[indices], self.labels[indices], self.class_names, texts)


class FileImages(LabeledImages):
    """Images read lazily from files (image folders): too many to hold in memory."""

    def __init__(
        self, paths: Sequence[str], labels: np.ndarray, class_names: Sequence[str], texts: Sequence[str] | None = None
    ) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.texts = list(texts) if texts is not None else None

    def load_image(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB")

    def subset(self, indices: np.ndarray) -> FileImages:
        texts = [self.texts[i] for i in indices] if self.texts is not None else None
        return FileImages([self.paths[i] for i in indices], self.labels[indices], self.class_names, texts)


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
    ``labels`` and optionally ``class_names`` and ``texts`` (one caption per image, a unicode array).
    Loaded with ``allow_pickle=False``."""
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
    labels = as_label_array(arrays["labels"])  # before the default class names below read its max
    if "images" in keys:
        images = arrays["images"]
    else:
        images = _decode_jpeg_blob(arrays["jpeg_bytes"], arrays["offsets"])
    if "class_names" in keys:
        class_names = [str(c) for c in arrays["class_names"]]
    else:
        class_names = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    texts = [str(t) for t in arrays["texts"]] if "texts" in keys else None
    return ArrayImages(images, labels, class_names, texts)


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
        raise ArrayFormatError(
            f"'{path.name}' is not an unsigned-byte IDX file; use the original MNIST files"
        )
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
    """Build the dataset a spec describes, apply its class filter and subset, refuse empty results.

    Raises:
        DataConfigError: naming ``field_name`` (and the file) for a bad spec or bad arrays.
    """
    if not isinstance(spec, DatasetSpec):
        spec = DatasetSpec(**spec)
    try:
        source = DATASET_SOURCES.get(spec.source)
    except KeyError as exc:
        raise DataConfigError(f"{field_name}.source: {exc.args[0]}") from None
    if spec.max_samples is not None and spec.max_samples < 1:  # before reading any file: fail fast
        raise DataConfigError(
            f"{field_name}.max_samples: must be >= 1 (or null for the whole set), got {spec.max_samples}"
        )
    try:
        dataset = source(spec, field_name)
    except ArrayFormatError as exc:  # the arrays' own check knows neither the field nor the file
        raise DataConfigError(f"{field_name}: in '{spec.path}', {exc}") from None
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


# ---------------------------------------------------------------------------------------------------
# coarse labels: a class-to-superclass map applied to the ID sets (``data.label_map``)

#: ``data.label_map``: one coarse id per fine class id (``[1, 1, 0, ...]``), or ``{coarse name: [fine class
#: names or ids]}`` (dict order gives the coarse ids)
LabelMap = list[int] | dict[str, list[int | str]]


class RelabeledImages(LabeledImages):
    """A dataset whose labels are mapped to coarse classes; images (and captions) are the base's.

    ``fine_labels`` / ``fine_class_names`` keep the original labels, e.g. for a fine-class probe
    diagnostic. Pre-training on superclasses and probing the fine classes is LOOK's transfer test.
    """

    def __init__(self, base: LabeledImages, mapping: np.ndarray, class_names: Sequence[str]) -> None:
        self.base = base
        self.mapping = np.asarray(mapping, dtype=np.int64)
        self.fine_labels = np.asarray(base.labels, dtype=np.int64)
        self.fine_class_names = list(base.class_names)
        self.labels = self.mapping[self.fine_labels]
        self.class_names = [str(c) for c in class_names]
        self.texts = base.texts

    def load_image(self, index: int) -> Image.Image:
        return self.base.load_image(index)

    def subset(self, indices: np.ndarray) -> RelabeledImages:
        return RelabeledImages(self.base.subset(indices), self.mapping, self.class_names)  # type: ignore[attr-defined]


def resolve_label_map(
    label_map: LabelMap, class_names: Sequence[str], set_field: str, field_name: str = "data.label_map"
) -> tuple[np.ndarray, list[str]]:
    """``(mapping [K_fine] -> coarse id, coarse class names)`` of ``label_map`` for a set whose fine
    classes are ``class_names``; every fine class must land in exactly one coarse class and every coarse
    class must get at least one fine class.

    Raises:
        DataConfigError: naming ``field_name`` and ``set_field`` and saying the fix.
    """
    fine = [str(c) for c in class_names]
    k = len(fine)
    where = f"{field_name} (applied to {set_field}, {k} classes)"
    if isinstance(label_map, dict):
        if not label_map:
            raise DataConfigError(f"{where}: the mapping is empty; give {{coarse name: [fine class names or ids]}}")
        mapping = np.full(k, -1, dtype=np.int64)
        for coarse, (name, members) in enumerate(label_map.items()):
            if isinstance(members, (str, int)) or not isinstance(members, Sequence) or not len(members):
                raise DataConfigError(
                    f"{where}: coarse class '{name}' needs a non-empty list of fine class names or ids, got {members!r}"
                )
            for member in members:
                if isinstance(member, bool) or not isinstance(member, (str, int, np.integer)):
                    raise DataConfigError(f"{where}: '{name}' lists {member!r}; give fine class names or integer ids")
                if isinstance(member, str):
                    if member not in fine:
                        raise DataConfigError(
                            f"{where}: '{name}' lists '{member}', which is not a class of {set_field} "
                            f"(its classes: {fine}); fix the name or give the class id"
                        )
                    fid = fine.index(member)
                else:
                    fid = int(member)
                    if not 0 <= fid < k:
                        raise DataConfigError(f"{where}: '{name}' lists class id {fid}; ids are 0..{k - 1}")
                if mapping[fid] >= 0 and mapping[fid] != coarse:
                    raise DataConfigError(
                        f"{where}: class '{fine[fid]}' is listed under both '{list(label_map)[mapping[fid]]}' "
                        f"and '{name}'; put every fine class in exactly one coarse class"
                    )
                mapping[fid] = coarse
        missing = [fine[i] for i in np.flatnonzero(mapping < 0)]
        if missing:
            raise DataConfigError(f"{where}: classes {missing} are in no coarse class; add each to one of {list(label_map)}")
        return mapping, [str(n) for n in label_map]
    if isinstance(label_map, str) or not isinstance(label_map, Sequence):
        raise DataConfigError(
            f"{where}: give a list with one coarse id per fine class (e.g. [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]) or "
            f"{{coarse name: [fine class names]}}, got {type(label_map).__name__}"
        )
    values = list(label_map)
    if len(values) != k:
        raise DataConfigError(
            f"{where}: the list has {len(values)} entries but {set_field} has {k} classes; give one coarse id per fine class"
        )
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 0]
    if bad:
        raise DataConfigError(f"{where}: entries must be integer coarse ids >= 0, got {bad[0]!r}")
    mapping = np.asarray(values, dtype=np.int64)
    unused = sorted(set(range(int(mapping.max()) + 1)) - set(mapping.tolist()))
    if unused:
        raise DataConfigError(
            f"{where}: coarse ids must be 0..S-1 with every id used; {unused} are unused (a class without data); renumber"
        )
    return mapping, [str(i) for i in range(int(mapping.max()) + 1)]


def apply_label_map(dataset: LabeledImages, label_map: LabelMap, set_field: str) -> RelabeledImages:
    """``dataset`` with its labels mapped by ``label_map`` (:func:`resolve_label_map`)."""
    mapping, names = resolve_label_map(label_map, dataset.class_names, set_field)
    return RelabeledImages(dataset, mapping, names)
