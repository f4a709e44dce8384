"""Covariate-shifted versions of the ID test set, reported as accuracy next to the OOD metrics.

WiSE-FT / BANG trade ID accuracy against accuracy under distribution shift; offline we cannot load
ImageNet-R or -Sketch, so the shifts are

* **corruptions generated on the fly** from the ID test images, following CIFAR-10-C
  (Hendrycks & Dietterich 2019, ``make_cifar_c.py``): per-severity parameters

  ===============  ==========================================  ============================
  corruption       parameter (severity 1 ... 5)                operation on x in [0, 1]
  ===============  ==========================================  ============================
  gaussian_noise   σ = 0.04, 0.06, 0.08, 0.09, 0.10            clip(x + N(0, σ²))
  gaussian_blur    σ = 0.4, 0.6, 0.7, 0.8, 1.0 (pixels)        Gaussian filter per channel
  contrast         c = 0.75, 0.5, 0.4, 0.3, 0.15               clip((x - μ_ch) · c + μ_ch)
  ===============  ==========================================  ============================

  The tables are CIFAR-10-C's. Differences ("approximately"): the blur is our own separable filter
  (truncated at 4σ, edge-replicating border -- the behaviour of ``skimage.filters.gaussian`` that
  CIFAR-10-C calls), noise comes from NumPy's PCG64 seeded per (seed, corruption, severity, image) so
  every model and every α sees the *same* corrupted pixels, and the source images are whatever the ID
  test set holds (the bundled CIFAR-10 test images are JPEG re-encodings, CIFAR-10-C used the originals).
  Results are uint8-truncated like CIFAR-10-C. Corruptions are applied at the native resolution,
  before the model's resize / normalisation.
* **extra ID-labelled sets** from config (``shifted_sets: {name: {source: npz, path: ...}}``), e.g.
  the 200 lossless CIFAR-10 PNGs (``data/cifar10/cifar10_kaggle_train200_png.npz``) against a model
  fine-tuned on JPEG images. Caveat for that file: its images are CIFAR-10 *training* images that the
  pre-trained ResNet-20 saw and whose JPEG versions are in ``cifar10_train_5k_jpeg.npz``; it probes the
  lossless-vs-JPEG domain, not generalisation to unseen images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from robustft.data.datamodule import CachedDataset, IndexedDataset, OODDataModule
from robustft.data.sources import DataConfigError, DatasetSpec, LabeledImages, load_dataset
from robustft.data.transforms import eval_transform
from robustft.registry import Registry

__all__ = [
    "CORRUPTIONS",
    "DEFAULT_CORRUPTIONS",
    "SEVERITY_TABLES",
    "CorruptedImages",
    "corrupt",
    "gaussian_filter",
    "shifted_test_sets",
]

SEVERITY_TABLES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
}
DEFAULT_CORRUPTIONS: tuple[str, ...] = ("gaussian_noise", "gaussian_blur", "contrast")

CorruptionFn = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]
CORRUPTIONS: Registry[CorruptionFn] = Registry("corruption")


def gaussian_filter(x: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Separable Gaussian filter over the two spatial axes of ``x`` [H, W, C] (edge-replicating)."""
    radius = int(truncate * sigma + 0.5)
    if radius == 0:
        return x.copy()
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    out = x.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        length = out.shape[axis]
        acc = np.zeros_like(out)
        for k, w in enumerate(kernel):
            acc += w * np.take(padded, np.arange(k, k + length), axis=axis)
        out = acc
    return out


@CORRUPTIONS.register("gaussian_noise")
def _gaussian_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + rng.normal(scale=sigma, size=x.shape), 0.0, 1.0)


@CORRUPTIONS.register("gaussian_blur")
def _gaussian_blur(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(gaussian_filter(x, sigma), 0.0, 1.0)


@CORRUPTIONS.register("contrast")
def _contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    means = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0.0, 1.0)


def _check(name: str, severity: int) -> None:
    if name not in SEVERITY_TABLES:
        raise DataConfigError(
            f"unknown corruption '{name}'; choose from {', '.join(SEVERITY_TABLES)} (CIFAR-10-C parameters)"
        )
    if not isinstance(severity, int) or not 1 <= severity <= len(SEVERITY_TABLES[name]):
        raise DataConfigError(f"corruption severity must be an integer in 1..5, got {severity!r}")


def corrupt(image: np.ndarray, name: str, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` (1-5) to a uint8 [H, W, C] image; returns uint8."""
    _check(name, severity)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected a uint8 [H, W, C] image, got {image.dtype} {image.shape}")
    rng = rng if rng is not None else np.random.default_rng(0)
    x = image.astype(np.float64) / 255.0
    y = CORRUPTIONS.get(name)(x, SEVERITY_TABLES[name][severity - 1], rng)
    return (y * 255.0).astype(np.uint8)  # truncation, as CIFAR-10-C's np.uint8(...)


class CorruptedImages(LabeledImages):
    """``base`` with a corruption applied on access, deterministically per (seed, corruption, severity, index)."""

    def __init__(self, base: LabeledImages, corruption: str, severity: int, seed: int = 0) -> None:
        _check(corruption, severity)
        self.base = base
        self.corruption = corruption
        self.severity = severity
        self.seed = seed
        self.labels = base.labels
        self.class_names = base.class_names
        self._corruption_id = list(SEVERITY_TABLES).index(corruption)

    def load_image(self, index: int) -> Image.Image:
        image = np.asarray(self.base.load_image(index).convert("RGB"))
        rng = np.random.default_rng([self.seed, self._corruption_id, self.severity, int(index)])
        return Image.fromarray(corrupt(image, self.corruption, self.severity, rng), mode="RGB")


class ShiftedSet(Dataset):
    """An ID-labelled shifted evaluation set and the ID classifier columns its classes are.

    ``class_indices`` is ``None`` when the set uses the ID label space as it is. Otherwise the set covers
    a subset (or a reordering) of the ID classes, e.g. ImageNet-R's 200 of ImageNet's 1000: its labels
    index its own class list and ``class_indices[label]`` is the ID class. WiSE-FT evaluates such sets
    with the logits restricted to those columns (``project_logits``).
    """

    def __init__(self, dataset: Dataset, class_indices: list[int] | None = None) -> None:
        self.dataset = dataset
        self.class_indices = class_indices

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> dict:
        return self.dataset[position]


PROJECTIONS = ("subset", "full")


def check_projection(mode: str, field_name: str) -> str:
    """Refuse an unknown ``shifted_projection`` before any data is loaded."""
    if mode not in PROJECTIONS:
        raise ValueError(f"{field_name}: unknown '{mode}'; choose {' or '.join(PROJECTIONS)}")
    return mode


def class_projection(set_names: Sequence[str], id_names: Sequence[str], field_name: str) -> list[int] | None:
    """The ID class index of each class of a shifted set (matched by name), or ``None`` if they coincide.

    Sets without class names (``"0"``, ``"1"``, ...) are taken to use the ID label space. A class that is
    not an ID class is an error: accuracy on it is undefined for the ID classifier.
    """
    set_names, id_names = [str(n) for n in set_names], [str(n) for n in id_names]
    if set_names == id_names:
        return None
    if all(n.isdigit() for n in set_names):
        if len(set_names) > len(id_names):
            raise DataConfigError(
                f"{field_name}: has {len(set_names)} classes but data.train has only {len(id_names)}; "
                "shifted sets must share the ID label space"
            )
        return None
    position = {name: i for i, name in enumerate(id_names)}
    missing = [n for n in set_names if n not in position]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataConfigError(
            f"{field_name}: classes {shown} are not classes of data.train; a shifted set must use the ID "
            "classes (all of them, or a subset such as ImageNet-R's 200 of ImageNet's 1000, matched by name)"
        )
    return [position[n] for n in set_names]


def project_logits(
    logits: Tensor, labels: Tensor, class_indices: Sequence[int] | None, mode: str = "subset"
) -> tuple[Tensor, Tensor]:
    """Logits and labels on which a shifted set's accuracy is computed.

    ``subset`` (WiSE-FT's convention for ImageNet-R/-A, the default): keep only the set's classes'
    columns, so the argmax is over the classes the set can contain; labels stay the set's own.
    ``full``: argmax over every ID class, with the set's labels mapped to ID class indices.
    """
    check_projection(mode, "shifted_projection")
    if class_indices is None:
        return logits, labels
    columns = torch.as_tensor(list(class_indices), dtype=torch.long, device=logits.device)
    if mode == "subset":
        return logits.index_select(1, columns), labels
    return logits, columns[labels]


def shifted_test_sets(
    datamodule: OODDataModule,
    corruptions: Sequence[str] = DEFAULT_CORRUPTIONS,
    severities: Sequence[int] = (3,),
    extra: Mapping[str, DatasetSpec | dict] | None = None,
    seed: int = 0,
    cache_mb: int = 1024,
) -> dict[str, ShiftedSet]:
    """ID-labelled shifted evaluation sets, named ``<corruption>-<severity>`` and by their config name.

    Corrupted sets are the datamodule's ID test set (``data.test``) with a corruption; ``extra`` sets
    are loaded like any dataset spec and must use the ID classes: all of them, or a subset matched by
    class name (``ShiftedSet.class_indices``, as ImageNet-R/-A in ImageNet's). All use the model's
    evaluation transform. Sets are transformed once and kept as tensors while they fit in ``cache_mb``
    (later ones are transformed on the fly), since a sweep scores the same images for every α.
    """
    for name in corruptions:
        for severity in severities:
            _check(name, severity)
    transform = eval_transform(datamodule.resolve_preprocess())
    sets: dict[str, IndexedDataset] = {}
    class_indices: dict[str, list[int]] = {}  # only sets of a subset / reordering of the ID classes
    if corruptions and severities:
        test = load_dataset(datamodule.specs["test"], "data.test")
        for name in corruptions:
            for severity in severities:
                sets[f"{name}-{severity}"] = IndexedDataset(CorruptedImages(test, name, severity, seed), transform)
    for name, spec in (extra or {}).items():
        if name in sets:
            raise DataConfigError(f"shifted_sets.{name}: the name is taken by a corruption set")
        images = load_dataset(spec, f"shifted_sets.{name}")
        columns = class_projection(images.class_names, datamodule.class_names, f"shifted_sets.{name}")
        if columns is not None:
            class_indices[name] = columns
        sets[name] = IndexedDataset(images, transform)
    size = datamodule.resolve_preprocess().image_size
    budget = cache_mb * 2**20
    out: dict[str, ShiftedSet] = {}
    for name, dataset in sets.items():
        needed = len(dataset) * 3 * size * size * 4
        kept = CachedDataset(dataset) if needed <= budget else dataset
        budget -= needed if needed <= budget else 0
        out[name] = ShiftedSet(kept, class_indices.get(name))
    return out
