"""``OODDataModule``: the one description of data shared by every method.

ID train / val / test plus named OOD sets grouped (``near``, ``far``, ...) and optional OOD
*validation* sets for hyper-parameter tuning. Transforms come from the model's backbone, so the same
YAML data block works for a CIFAR ResNet and a CLIP ViT.

Training batch layouts (evaluation batches are always ``{"image": [B, C, H, W], "label": [B], "index": [B]}``):

- default (``n_views: 1``, no ``unlabeled``): ``{"image": [B, C, H, W], "label": [B], "index": [B]}``,
  exactly as before these options existed, plus ``"text"`` (a list of B strings) when the training
  source has captions (npz ``texts``; see :mod:`robustft.data.captions` for template captions);
- ``n_views: V`` > 1: ``"image"`` is ``[B, V, C, H, W]``, V independent draws of the training transform
  on the same image (``image[:, v]`` is view v; PALM's view-major ``[V*B, ...]`` stack is
  ``image.transpose(0, 1).flatten(0, 1)``); ``label`` and ``index`` stay ``[B]``;
- with ``unlabeled``: ``{"labeled": <the batch above>, "unlabeled": {"image": [Bu, C, H, W] (or
  [Bu, V, C, H, W]), "true_label": [Bu], "index": [Bu], "source": [Bu]}}`` from a ``CombinedLoader`` in
  ``min_size`` mode (:mod:`robustft.data.unlabeled` says why); ``true_label`` is for diagnostics only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Sampler

from robustft.backbones.base import PreprocessConfig
from robustft.data.fewshot import few_shot_indices, split_after_shots
from robustft.data.sources import (
    DataConfigError,
    DatasetSpec,
    LabeledImages,
    LabelMap,
    apply_label_map,
    load_dataset,
)
from robustft.data.transforms import TRAIN_TRANSFORMS, apply_views, eval_transform, train_transform
from robustft.data.unlabeled import UnlabeledImages, UnlabeledLoader, UnlabeledStream
from robustft.ood.report import GROUP_ROW_SET

DEFAULT_PREPROCESS = PreprocessConfig(image_size=32)


class IndexedDataset(Dataset):
    """Applies a transform and returns dict samples with the sample's index.

    The index travels with every sample so that distributed evaluation can put gathered outputs back
    in order and count each sample exactly once. With ``n_views`` = V > 1 the ``image`` is the
    ``[V, C, H, W]`` stack of V independent draws of ``transform``; a source with captions adds ``text``.
    """

    def __init__(
        self, images: LabeledImages, transform: Callable, indices: np.ndarray | None = None, n_views: int = 1
    ) -> None:
        self.images = images
        self.transform = transform
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices)
        self.n_views = n_views

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.images.labels[self.indices]

    def __getitem__(self, position: int) -> dict:
        source_index = int(self.indices[position])
        image, label = self.images[source_index]
        sample = {"image": apply_views(self.transform, image, self.n_views), "label": label, "index": position}
        texts = getattr(self.images, "texts", None)
        if texts is not None:
            sample["text"] = texts[source_index]
        return sample


class CachedDataset(Dataset):
    """An evaluation set whose (deterministic) eval transform was applied once and kept as one tensor.

    Evaluation runs every epoch over the same ID test and OOD images; re-decoding and re-normalising
    them each time would cost as much as the forward pass of a small model.
    """

    def __init__(self, dataset: IndexedDataset) -> None:
        samples = [dataset[i] for i in range(len(dataset))]
        self.images = torch.stack([s["image"] for s in samples])
        self.labels_tensor = torch.tensor([s["label"] for s in samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels_tensor)

    @property
    def labels(self) -> np.ndarray:
        return self.labels_tensor.numpy()

    def __getitem__(self, position: int) -> dict:
        return {"image": self.images[position], "label": int(self.labels_tensor[position]), "index": position}


class SampledDataset(Dataset):
    """A fixed, seeded random subset of an evaluation set, re-indexed 0..n-1.

    Per-epoch monitoring can evaluate a few hundred samples per set instead of the whole set; the same
    subset every epoch keeps the curves comparable, and the fresh ``index`` keeps the distributed
    gather's exactly-once check (indices 0..n-1) valid.
    """

    def __init__(self, dataset: Dataset, max_samples: int, seed: int = 0) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.dataset = dataset
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(dataset), generator=generator)[:max_samples]
        self.positions = torch.sort(chosen).values.tolist()

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.dataset.labels)[self.positions]

    def __getitem__(self, position: int) -> dict:
        return {**self.dataset[self.positions[position]], "index": position}


def sample_eval_set(dataset: Dataset, max_samples: int | None, seed: int = 0) -> Dataset:
    """``dataset`` itself when it has at most ``max_samples`` samples (or no limit), else a seeded subset."""
    if max_samples is None or len(dataset) <= max_samples:
        return dataset
    return SampledDataset(dataset, max_samples, seed)


def _unlabeled_specs(unlabeled: dict[str, DatasetSpec] | list[DatasetSpec] | None) -> dict[str, DatasetSpec]:
    """``data.unlabeled`` as ``{name: spec}``: a list gets the names ``0``, ``1``, ..."""
    if unlabeled is None:
        return {}
    if isinstance(unlabeled, dict) and not {"source", "path"} <= set(unlabeled):
        return {str(name): spec for name, spec in unlabeled.items()}
    if isinstance(unlabeled, (DatasetSpec, dict)):  # a single spec
        return {"0": unlabeled}
    if isinstance(unlabeled, (list, tuple)):
        return {str(i): spec for i, spec in enumerate(unlabeled)}
    raise DataConfigError(
        f"data.unlabeled: give {{name: dataset spec}} or a list of dataset specs, got {type(unlabeled).__name__}"
    )


def _spec_path(spec: DatasetSpec | dict) -> str:
    """The ``path`` of a spec given as a :class:`DatasetSpec` or as a plain dict."""
    return str(spec.path if isinstance(spec, DatasetSpec) else spec.get("path"))


def _check_ood_names(ood: dict[str, dict[str, DatasetSpec]]) -> None:
    """Refuse OOD set names that would clash.

    A set's name keys its loaded data (``ood/<name>``), its logged metrics (``ood/<name>/<score>/...``)
    and its report rows, so two different sets with one name would silently share one entry, and a set
    named like a group (or like the report's group-mean rows) would share the group mean's keys. The
    *same* spec listed in two groups is one set counted in both group means, which the report supports.
    ``ood_val`` sets live under ``ood_val/<name>`` and are never reported by name, so they may reuse a name.
    """
    seen: dict[str, tuple[str, object]] = {}
    for group, sets in ood.items():
        for name, spec in (sets or {}).items():
            where = f"data.ood.{group}.{name}"
            if name in seen and seen[name][1] != spec:
                raise DataConfigError(
                    f"{where}: the name '{name}' is already used by {seen[name][0]} for a different set; "
                    "OOD set names must be unique across groups (both would be stored and logged as "
                    f"ood/{name}). Rename one of them."
                )
            if name in ood:
                raise DataConfigError(
                    f"{where}: the set name '{name}' is also a group name (data.ood.{name}), so the set and "
                    f"the group mean would both be logged as ood/{name}/<score>/<metric>. Rename the set."
                )
            if name == GROUP_ROW_SET:
                raise DataConfigError(
                    f"{where}: the set name '{name}' is what the report writes for group-mean rows. "
                    "Rename the set."
                )
            seen.setdefault(name, (where, spec))


class OODDataModule(pl.LightningDataModule):
    """ID train/val/test and grouped OOD sets.

    Args:
        train: ID training set.
        test: ID test set (the ID side of every OOD metric).
        val: ID validation set; when omitted, ``val_fraction`` of ``train`` is carved off with ``seed``.
        ood: OOD test sets, ``{group: {name: spec}}``, e.g. ``{"near": {"tin": ...}, "far": {...}}``.
        ood_val: OOD validation sets ``{name: spec}``, used only to tune post-hoc hyper-parameters.
        val_fraction: fraction of ``train`` held out as ID validation when ``val`` is not given.
        batch_size: training batch size (per process).
        eval_batch_size: batch size of evaluation loaders (defaults to ``batch_size``).
        num_workers: DataLoader workers.
        augmentation: name of the training transform in ``robustft.data.transforms.TRAIN_TRANSFORMS``:
            ``crop_flip`` (CIFAR), ``random_resized_crop`` (CLIP fine-tuning), ``simclr`` (PALM / LOOK:
            crop 0.2-1, flip, colour jitter, grayscale) or ``none``.
        preprocess: how images are prepared (size/mean/std): the model's preprocessing, passed in.
            ``python -m robustft`` passes ``model.preprocess`` itself; in Python give
            ``preprocess=model.preprocess`` (or call :meth:`set_preprocess`). Unset: CIFAR 32x32.
        seed: seed of the validation split and of the training shuffle.
        eval_cache_mb: memory budget for keeping evaluation sets (ID test, OOD, reference) as
            pre-transformed tensors across epochs; sets that do not fit are transformed on the fly.
        n_views: V independently augmented views of every training image (PALM / LOOK 2, Local-Prompt
            16); V > 1 makes the training ``image`` ``[B, V, C, H, W]`` (module docstring). Evaluation
            is unchanged.
        shots_per_class: train on K images per class only (few-shot), chosen from ``train`` by
            ``shots_seed`` alone (:mod:`robustft.data.fewshot`); the validation split carved from
            ``train`` is drawn from the other images. ``None``: the whole training set.
        shots_seed: seed of the few-shot choice (default: ``seed``).
        unlabeled: unlabelled training sets, ``{name: spec}`` or a list of specs (any source; their labels
            are kept as ``true_label`` for diagnostics only), delivered next to the labelled stream
            (module docstring; :mod:`robustft.data.unlabeled`). They get the training transform and ``n_views``.
        unlabeled_batch_size: batch size of the unlabelled stream (per process; default ``batch_size``).
        label_map: train on coarse classes: map the ID sets' (train / val / test) fine classes to
            superclasses, either one coarse id per fine class id (``[1, 1, 0, 0, 0, 0, 0, 0, 1, 1]``:
            CIFAR-10 vehicles = 1, animals = 0) or ``{coarse name: [fine class names or ids]}`` (dict
            order = coarse ids). ``model.num_classes`` is then the number of superclasses. OOD sets are
            untouched. Checked against each set's class names when it loads
            (:func:`robustft.data.sources.resolve_label_map`).
        device_augmentation: decode the training set once into a uint8 tensor and run the training
            augmentation (``crop_flip`` or ``none``, any ``n_views``) and the normalisation on the
            accelerator, batch-wise (:mod:`robustft.data.device_augment`): for small images on a GPU,
            where per-image PIL transforms starve it. Off by default.
    """

    def __init__(
        self,
        train: DatasetSpec,
        test: DatasetSpec,
        val: DatasetSpec | None = None,
        ood: dict[str, dict[str, DatasetSpec]] | None = None,
        ood_val: dict[str, DatasetSpec] | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        augmentation: str = "crop_flip",
        preprocess: PreprocessConfig | None = None,
        seed: int = 0,
        eval_cache_mb: int = 1024,
        n_views: int = 1,
        shots_per_class: int | None = None,
        shots_seed: int | None = None,
        unlabeled: dict[str, DatasetSpec] | list[DatasetSpec] | None = None,
        unlabeled_batch_size: int | None = None,
        label_map: LabelMap | None = None,
        device_augmentation: bool = False,
    ) -> None:
        super().__init__()
        try:
            TRAIN_TRANSFORMS.get(augmentation)
        except KeyError as exc:
            raise DataConfigError(f"data.augmentation: {exc}") from None
        if n_views < 1:
            raise DataConfigError(f"data.n_views: must be >= 1 (views per training image), got {n_views}")
        if shots_per_class is not None and shots_per_class < 1:
            raise DataConfigError(
                f"data.shots_per_class: must be >= 1 (images per class), or null for the whole set; got {shots_per_class}"
            )
        if unlabeled_batch_size is not None and unlabeled_batch_size < 1:
            raise DataConfigError(
                f"data.unlabeled_batch_size: must be >= 1, or null to use data.batch_size; got {unlabeled_batch_size}"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise DataConfigError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise DataConfigError(f"data.batch_size: must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise DataConfigError(
                f"data.eval_batch_size: must be >= 1, or null to use data.batch_size; got {eval_batch_size}"
            )
        if num_workers < 0:
            raise DataConfigError(
                f"data.num_workers: must be >= 0 (0 loads in the main process), got {num_workers}"
            )
        if eval_cache_mb < 0:
            raise DataConfigError(
                f"data.eval_cache_mb: must be >= 0 (0 disables the cache), got {eval_cache_mb}"
            )
        self.specs = {"train": train, "test": test, "val": val}
        self.ood_specs = ood or {}
        self.ood_val_specs = ood_val or {}
        _check_ood_names(self.ood_specs)
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.augmentation = augmentation
        self.preprocess = preprocess
        self.seed = seed
        self.eval_cache_mb = eval_cache_mb
        self.n_views = n_views
        self.shots_per_class = shots_per_class
        self.shots_seed = seed if shots_seed is None else shots_seed
        self.unlabeled_specs = _unlabeled_specs(unlabeled)
        if label_map is not None and (isinstance(label_map, str) or not isinstance(label_map, (list, tuple, dict))):
            raise DataConfigError(
                "data.label_map: give a list with one coarse id per fine class or {coarse name: [fine class names]}, "
                f"got {type(label_map).__name__}"
            )
        self.label_map = label_map
        if device_augmentation:
            from robustft.data.device_augment import check_device_augmentation

            check_device_augmentation(augmentation, bool(self.unlabeled_specs))
        self.device_augmentation = device_augmentation
        self.unlabeled_batch_size = batch_size if unlabeled_batch_size is None else unlabeled_batch_size
        self._cache: dict[tuple, CachedDataset] = {}
        self._loaded: dict[str, LabeledImages] = {}
        self._train_indices: np.ndarray | None = None
        self._val_indices: np.ndarray | None = None

    # ----------------------------------------------------------------------------------- loading
    def _load(self, key: str, spec: DatasetSpec, field_name: str) -> LabeledImages:
        if key not in self._loaded:
            dataset = load_dataset(spec, field_name)
            if getattr(self, "label_map", None) is not None and key in ("train", "val", "test"):
                dataset = apply_label_map(dataset, self.label_map, field_name)  # coarse ID classes
            self._loaded[key] = dataset
        return self._loaded[key]

    @property
    def train_images(self) -> LabeledImages:
        return self._load("train", self.specs["train"], "data.train")

    @property
    def class_names(self) -> list[str]:
        return self.train_images.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def ood_groups(self) -> dict[str, list[str]]:
        """``{group: [set names]}`` in config order."""
        return {group: list(sets) for group, sets in self.ood_specs.items()}

    def _split_train_val(self) -> None:
        n = len(self.train_images)
        if self.shots_per_class is not None:
            shots = few_shot_indices(
                self.train_images.labels, self.shots_per_class, self.shots_seed, self.class_names,
                f"data.train ('{_spec_path(self.specs['train'])}')",
            )
            carve = self.specs["val"] is None and self.val_fraction > 0
            self._train_indices = shots
            self._val_indices = split_after_shots(n, shots, self.val_fraction if carve else 0.0, self.seed)
            return
        if self.specs["val"] is not None or self.val_fraction == 0:
            self._train_indices, self._val_indices = np.arange(n), np.arange(0)
            return
        permutation = np.random.default_rng(self.seed).permutation(n)
        n_val = max(1, int(round(n * self.val_fraction)))
        self._val_indices = np.sort(permutation[:n_val])
        self._train_indices = np.sort(permutation[n_val:])

    def set_preprocess(self, preprocess: PreprocessConfig | None) -> None:
        """Prepare images for a model with this preprocessing (``model.preprocess``) from now on.

        Datasets built afterwards use it; cached evaluation tensors are keyed by it, so none is reused."""
        self.preprocess = preprocess

    def resolve_preprocess(self) -> PreprocessConfig:
        """The preprocessing passed in (``preprocess``, linked from the model by the CLI, or
        :meth:`set_preprocess`, called by ``OODMethod.setup``), else CIFAR 32x32."""
        return self.preprocess if self.preprocess is not None else DEFAULT_PREPROCESS

    def setup(self, stage: str | None = None) -> None:
        """Load every configured set now, so a bad path fails before any training starts."""
        self.train_images  # noqa: B018 - loads and validates
        self._load("test", self.specs["test"], "data.test")
        if self.specs["val"] is not None:
            self._load("val", self.specs["val"], "data.val")
        for group, sets in self.ood_specs.items():
            for name, spec in sets.items():
                self._load(f"ood/{name}", spec, f"data.ood.{group}.{name}")
        for name, spec in self.ood_val_specs.items():
            self._load(f"ood_val/{name}", spec, f"data.ood_val.{name}")
        for name, spec in self.unlabeled_specs.items():
            self._load(f"unlabeled/{name}", spec, f"data.unlabeled.{name}")
        if self._train_indices is None:
            self._split_train_val()
        self._check_labels()

    def _check_labels(self) -> None:
        """Refuse ID labels that are not class ids of ``data.train`` now, not as an IndexError (train)
        or a wrong accuracy (test / val) at the first step. OOD labels are never used, so not checked."""
        k = self.num_classes
        ids = f"ids 0..{k - 1}" if k else "no ids"
        for key in ("train", "test", "val"):
            if key not in self._loaded or not len(self._loaded[key].labels):
                continue
            labels = self._loaded[key].labels
            low, top = int(labels.min()), int(labels.max())
            if low >= 0 and top < k:
                continue
            where = f"data.{key}: label {low if low < 0 else top} in '{_spec_path(self.specs[key])}'"
            if key == "train":
                raise DataConfigError(
                    f"{where} is not a class id: the set has {k} class names ({ids}); fix the labels, "
                    "or give a class name for every class (class_names of an npz file)"
                )
            raise DataConfigError(
                f"{where} is not a class of data.train: data.train has only {k} classes ({ids}); "
                "ID sets must share the training label space"
            )

    # ----------------------------------------------------------------------------------- datasets
    def train_dataset(self) -> Dataset:
        cfg = self.resolve_preprocess()
        if getattr(self, "device_augmentation", False):  # decoded once, augmented on the device
            from robustft.data.device_augment import UInt8TrainingSet

            decoded = getattr(self, "_decoded_train", None)  # (cfg, set): not counted in eval_cache_mb
            if decoded is None or decoded[0] != cfg:
                decoded = self._decoded_train = (cfg, UInt8TrainingSet(self.train_images, cfg, self._train_indices))
            return decoded[1]
        transform = train_transform(cfg, self.augmentation)
        return IndexedDataset(self.train_images, transform, self._train_indices, n_views=self.n_views)

    def unlabeled_dataset(self) -> UnlabeledImages | None:
        """The ``unlabeled`` sets as one dataset with the training transform, or ``None`` without any."""
        if not self.unlabeled_specs:
            return None
        sets = [
            self._load(f"unlabeled/{name}", spec, f"data.unlabeled.{name}") for name, spec in self.unlabeled_specs.items()
        ]
        transform = train_transform(self.resolve_preprocess(), self.augmentation)
        return UnlabeledImages(sets, transform, self.n_views, names=list(self.unlabeled_specs))

    def _cached(self, key: str, dataset: IndexedDataset) -> Dataset:
        """``dataset`` as a :class:`CachedDataset` if it fits in what is left of ``eval_cache_mb``."""
        cfg = self.resolve_preprocess()
        cache_key = (key, cfg)
        if cache_key in self._cache:
            return self._cache[cache_key]
        used = sum(c.images.numel() * 4 for c in self._cache.values())
        needed = len(dataset) * 3 * cfg.image_size * cfg.image_size * 4
        if used + needed > self.eval_cache_mb * 2**20:
            return dataset
        self._cache[cache_key] = CachedDataset(dataset)
        return self._cache[cache_key]

    def reference_dataset(self) -> Dataset:
        """ID training images with the *evaluation* transform: the reference bank of KNN/MDS/ViM."""
        dataset = IndexedDataset(self.train_images, eval_transform(self.resolve_preprocess()), self._train_indices)
        return self._cached("reference", dataset)

    def val_dataset(self) -> IndexedDataset | None:
        transform = eval_transform(self.resolve_preprocess())
        if self.specs["val"] is not None:
            return IndexedDataset(self._loaded["val"], transform)
        if self._val_indices is not None and len(self._val_indices):
            return IndexedDataset(self.train_images, transform, self._val_indices)
        return None

    def test_dataset(self) -> Dataset:
        return self._cached("test", IndexedDataset(self._loaded["test"], eval_transform(self.resolve_preprocess())))

    def ood_datasets(self, split: str = "test") -> dict[str, Dataset]:
        """OOD sets with the evaluation transform: ``split='test'`` the grouped sets, ``'val'`` ood_val."""
        transform = eval_transform(self.resolve_preprocess())
        if split == "test":
            names = [name for sets in self.ood_specs.values() for name in sets]
            return {
                name: self._cached(f"ood/{name}", IndexedDataset(self._loaded[f"ood/{name}"], transform))
                for name in names
            }
        if split == "val":
            return {
                name: self._cached(f"ood_val/{name}", IndexedDataset(self._loaded[f"ood_val/{name}"], transform))
                for name in self.ood_val_specs
            }
        raise ValueError(f"split must be 'test' or 'val', got '{split}'")

    # ----------------------------------------------------------------------------------- loaders
    def eval_loader(self, dataset: Dataset, sampler: Sampler | None = None) -> DataLoader:
        """A deterministic evaluation loader (no shuffle, no dropped samples)."""
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        """The labelled training loader; with ``unlabeled`` sets, ``CombinedLoader({"labeled": ...,
        "unlabeled": ...}, "min_size")`` (robustft/data/unlabeled.py says why ``min_size``)."""
        # draws what DataLoader(shuffle=True, generator=seeded) draws, and resumes exactly mid-epoch from
        # the position that state_dict() saved (robustft/data/resumable.py)
        from robustft.data.resumable import resumable_train_loader

        resume_state, self._train_resume_state = getattr(self, "_train_resume_state", None), None
        labeled = resumable_train_loader(self.train_dataset(), self.batch_size, self.seed, self.num_workers, resume_state)
        unlabeled = self.unlabeled_dataset()
        if unlabeled is None:
            return labeled
        trainer = getattr(self, "trainer", None)
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        stream = UnlabeledStream(unlabeled, self.unlabeled_batch_size, self.seed, rank, world_size)
        resume_state, self._unlabeled_resume_state = getattr(self, "_unlabeled_resume_state", None), None
        loader = UnlabeledLoader(stream, resume_state=resume_state, num_workers=self.num_workers)
        return CombinedLoader({"labeled": labeled, "unlabeled": loader}, mode="min_size")

    def state_dict(self) -> dict:
        """The training loaders' positions (shuffle / augmentation RNG, batches done), saved in checkpoints:
        ``{"train_loader": ..., "unlabeled_loader": ...}`` (each only when it exists)."""
        from robustft.data.resumable import train_loader_state

        return train_loader_state(getattr(self, "trainer", None))

    def load_state_dict(self, state_dict: dict) -> None:
        self._train_resume_state = state_dict.get("train_loader")
        self._unlabeled_resume_state = state_dict.get("unlabeled_loader")

    def _distributed_eval_sampler(self, dataset: Dataset) -> Sampler | None:
        """Under DDP, each rank's disjoint, unpadded shard of ``dataset`` (``rank::world_size``), so that
        ``val/acc`` and ``test/acc`` count every sample exactly once (Lightning's own sampler would pad the
        ranks with repeats). ``None`` (Lightning's default) in a single process."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return None
        from robustft.evaluation.distributed import UnpaddedDistributedSampler  # engine imports this module

        return UnpaddedDistributedSampler(dataset, trainer.world_size, trainer.global_rank)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``device_augmentation``, augment and normalise uint8 training batches on their device
        (evaluation batches are float already and pass through)."""
        image = batch.get("image") if getattr(self, "device_augmentation", False) and isinstance(batch, dict) else None
        if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
            from robustft.data.device_augment import augment_batch

            batch = {**batch, "image": augment_batch(image, self.resolve_preprocess(), self.augmentation, self.n_views)}
        return batch

    def val_dataloader(self) -> DataLoader | list:
        dataset = self.val_dataset()
        return self.eval_loader(dataset, self._distributed_eval_sampler(dataset)) if dataset is not None else []

    def test_dataloader(self) -> DataLoader:
        dataset = self.test_dataset()
        return self.eval_loader(dataset, self._distributed_eval_sampler(dataset))

    def predict_dataloader(self) -> DataLoader:
        return self.eval_loader(self.test_dataset())
