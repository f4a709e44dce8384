"""webdataset shards: an indexed (map-style) source for evaluation and a resampled stream for training.

Shards are plain POSIX tar files in which the files sharing a basename form one sample
(``000001.png`` + ``000001.cls`` [+ ``000001.txt``]); ``tools/make_shards.py`` writes them with
``webdataset.ShardWriter``, but any ``tar`` of such files works.

Evaluation must count every sample exactly once across ranks, which a webdataset *stream* cannot
promise (webdataset FAQ, issues #225/#364). So the ``webdataset`` dataset source indexes the tar
members once (offset and size of every member, read with :mod:`tarfile`) and serves samples by index:
it is an ordinary :class:`~robustft.data.sources.LabeledImages`, and the existing
:class:`~robustft.evaluation.distributed.ShardSampler` reads each sample on exactly one rank.

Training on large data uses :class:`WebDatasetTrainStream` (open_clip's recipe): resampled shards,
a shuffle buffer, decode + transform, batching inside the dataset, and a fixed number of batches per
worker, so every rank takes the same number of steps per epoch whatever the number of workers.
:class:`WebDataModule` selects it for ``data.train``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from robustft.data.datamodule import OODDataModule
from robustft.data.sources import DATASET_SOURCES, DataConfigError, DatasetSpec, LabeledImages
from robustft.data.transforms import train_transform

#: member extensions read as the sample's image, in order of preference
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "pnm")
#: member extensions read as the sample's integer label, in order of preference
LABEL_KEYS = ("cls", "label", "class")
MANIFEST_NAME = "manifest.json"


# ------------------------------------------------------------------------------------------ shards


@dataclass
class ShardList:
    """The shard files a ``path`` names, plus what a manifest says about them (if there is one)."""

    paths: list[str]
    class_names: list[str] | None = None
    counts: list[int] | None = None  # samples per shard, from a manifest


def _read_manifest(path: Path, field_name: str) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataConfigError(f"{field_name}.path: cannot read manifest '{path}' ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DataConfigError(
            f"{field_name}.path: '{path}' is not a shard manifest; expected "
            '{"shards": [{"url": ..., "count": ...}], "total": N, "class_names": [...]}'
        )
    return manifest


def resolve_shards(path: str, field_name: str = "data") -> ShardList:
    """Shard files named by ``path``: a manifest ``.json`` (urls relative to it), a brace pattern
    (``train-{000000..000009}.tar``), a glob, a directory of ``.tar`` files, or one ``.tar`` file.

    A directory (or the folder of a pattern) holding ``manifest.json`` takes its ``class_names``.
    """
    manifest_path: Path | None = None
    if path.endswith(".json"):
        manifest_path = Path(path)
        if not manifest_path.is_file():
            raise DataConfigError(f"{field_name}.path: manifest '{path}' does not exist")
        manifest = _read_manifest(manifest_path, field_name)
        root = manifest_path.parent
        paths = []
        for entry in manifest["shards"]:
            url = entry["url"] if isinstance(entry, dict) else str(entry)
            paths.append(url if os.path.isabs(url) else str(root / url))
        counts = [int(e["count"]) for e in manifest["shards"] if isinstance(e, dict) and "count" in e]
        return ShardList(
            _check_exist(paths, path, field_name),
            manifest.get("class_names"),
            counts if len(counts) == len(paths) else None,
        )
    if "{" in path:
        paths = list(braceexpand.braceexpand(path))
        folder = Path(paths[0]).parent if paths else Path(".")
    elif any(c in path for c in "*?["):
        paths = sorted(glob.glob(path))
        folder = Path(path).parent
    elif Path(path).is_dir():
        folder = Path(path)
        paths = sorted(str(p) for p in folder.iterdir() if p.name.endswith(".tar"))
    else:
        paths = [path]
        folder = Path(path).parent
    if not paths:
        raise DataConfigError(
            f"{field_name}.path: '{path}' names no .tar shards. Give a brace pattern "
            "(train-{000000..000009}.tar), a directory of .tar files or a manifest .json"
        )
    paths = _check_exist(paths, path, field_name)
    class_names = None
    if (folder / MANIFEST_NAME).is_file():
        class_names = _read_manifest(folder / MANIFEST_NAME, field_name).get("class_names")
    return ShardList(paths, class_names)


def _check_exist(paths: list[str], pattern: str, field_name: str) -> list[str]:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataConfigError(
            f"{field_name}.path: {len(missing)} of {len(paths)} shards named by '{pattern}' do not exist "
            f"(first: '{missing[0]}')"
        )
    return paths


def split_key(name: str) -> tuple[str | None, str | None]:
    """webdataset's sample grouping: key = path up to the first dot of the basename, rest = extension."""
    folder, _, base = name.rpartition("/")
    if "." not in base:
        return None, None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def pick_image_key(keys: Sequence[str]) -> str | None:
    for key in IMAGE_KEYS:
        if key in keys:
            return key
    for key in keys:  # e.g. "image.png", "seg.jpg"
        if key.rsplit(".", 1)[-1] in IMAGE_KEYS:
            return key
    return None


def parse_label(data: bytes) -> int:
    return int(data.decode("utf-8").strip())


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


# ------------------------------------------------------------------------------------- map-style


class ShardImages(LabeledImages):
    """Samples of tar shards read by index: the members of every shard are indexed once (offset and
    size of each sample's image; labels read at indexing time), then each image is one ``pread``.

    Safe with DataLoader workers (file descriptors are per process, reads are positional).
    """

    def __init__(
        self,
        shards: Sequence[str],
        shard_index: np.ndarray,
        offsets: np.ndarray,
        sizes: np.ndarray,
        labels: np.ndarray,
        class_names: Sequence[str],
        keys: Sequence[str] | None = None,
    ) -> None:
        self.shards = list(shards)
        self.shard_index = np.asarray(shard_index, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = [str(c) for c in class_names]
        self.keys = list(keys) if keys is not None else None
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    @classmethod
    def from_shards(cls, shard_list: ShardList, field_name: str = "data") -> ShardImages:
        shard_ids: list[int] = []
        offsets: list[int] = []
        sizes: list[int] = []
        labels: list[int] = []
        keys: list[str] = []
        any_label = False
        for s, shard in enumerate(shard_list.paths):
            try:
                samples = index_tar(shard)
            except (tarfile.TarError, OSError) as exc:
                raise DataConfigError(f"{field_name}.path: cannot read shard '{shard}' as a tar file ({exc})") from exc
            if shard_list.counts is not None and len(samples) != shard_list.counts[s]:
                raise DataConfigError(
                    f"{field_name}.path: shard '{shard}' holds {len(samples)} samples but the manifest says "
                    f"{shard_list.counts[s]}; the shard is truncated or the manifest is stale"
                )
            for key, (image, label) in samples.items():
                if image is None:
                    raise DataConfigError(
                        f"{field_name}.path: sample '{key}' of shard '{shard}' has no image member "
                        f"(one of {', '.join(IMAGE_KEYS)})"
                    )
                shard_ids.append(s)
                offsets.append(image[0])
                sizes.append(image[1])
                labels.append(0 if label is None else label)
                any_label |= label is not None
                keys.append(key)
        labels_array = np.asarray(labels, dtype=np.int64)
        if shard_list.class_names is not None:
            class_names = list(shard_list.class_names)
        elif any_label and len(labels_array):
            class_names = [str(i) for i in range(int(labels_array.max()) + 1)]
        else:
            class_names = ["unlabeled"]
        return cls(shard_list.paths, shard_ids, offsets, sizes, labels_array, class_names, keys)

    def _fd(self, shard: int) -> int:
        if os.getpid() != self._pid:  # forked worker: never share descriptors with the parent
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return fd

    def read_bytes(self, index: int) -> bytes:
        size = int(self.sizes[index])
        data = os.pread(self._fd(int(self.shard_index[index])), size, int(self.offsets[index]))
        if len(data) != size:
            raise OSError(f"short read of sample {index} from '{self.shards[int(self.shard_index[index])]}'")
        return data

    def load_image(self, index: int) -> Image.Image:
        return decode_image(self.read_bytes(index))

    def subset(self, indices: np.ndarray) -> ShardImages:
        keys = [self.keys[i] for i in indices] if self.keys is not None else None
        return ShardImages(
            self.shards, self.shard_index[indices], self.offsets[indices], self.sizes[indices],
            self.labels[indices], self.class_names, keys,
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_fds", {}).values():
                try:
                    os.close(fd)
                except OSError:
                    pass


def index_tar(path: str) -> dict[str, tuple[tuple[int, int] | None, int | None]]:
    """``{sample key: ((image offset, image size) | None, label | None)}`` in order of first appearance.

    Members are grouped by key wherever they sit in the tar (a plain ``tar`` need not keep a sample's
    files adjacent); directories and webdataset's ``__meta__`` members are skipped.
    """
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    with open(path, "rb") as handle:
        if handle.read(2) == b"\x1f\x8b":
            raise tarfile.ReadError("compressed (gzip) shards cannot be read by index; store them as plain .tar")
        handle.seek(0)
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = split_key(info.name)
                if key is None or os.path.basename(key).startswith("__"):
                    continue
                members.setdefault(key, {})[ext] = info
        fd = handle.fileno()
        out: dict[str, tuple[tuple[int, int] | None, int | None]] = {}
        for key, files in members.items():
            image_key = pick_image_key(list(files))
            image = (files[image_key].offset_data, files[image_key].size) if image_key else None
            label_key = next((k for k in LABEL_KEYS if k in files), None)
            label = None
            if label_key is not None:
                info = files[label_key]
                label = parse_label(os.pread(fd, info.size, info.offset_data))
            out[key] = (image, label)
    return out


@DATASET_SOURCES.register("webdataset")
def load_webdataset(spec: DatasetSpec, field_name: str) -> LabeledImages:
    """webdataset tar shards (``path``: brace pattern, directory of .tar files, or manifest .json),
    indexed for exact map-style access. Labels from ``.cls`` members (0 when absent: unlabeled OOD sets)."""
    return ShardImages.from_shards(resolve_shards(spec.path, field_name), field_name)


# ------------------------------------------------------------------------------------- streaming


def _mix_seed(*values: int) -> int:
    digest = hashlib.sha256(",".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def stream_collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        # a stream has no stable sample positions; -1 says so (evaluation never uses streams)
        "index": torch.full((len(samples),), -1, dtype=torch.long),
    }


class _DecodeTransform:
    """Sample dict from a tar -> ``{"image": transformed tensor, "label": int}`` (picklable)."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image_key = pick_image_key([k for k in sample if not k.startswith("__")])
        if image_key is None:
            raise ValueError(f"sample '{sample.get('__key__')}' of '{sample.get('__url__')}' has no image member")
        label = next((parse_label(sample[k]) for k in LABEL_KEYS if k in sample), 0)
        return {"image": self.transform(decode_image(sample[image_key])), "label": label}


class _EpochShards(IterableDataset):
    """Non-resampled shard order: every epoch reshuffles the shard list (same on all ranks), then
    gives this rank x worker its slice, repeated until the epoch's batch budget is spent."""

    def __init__(self, urls: list[str], seed: int, rank: int, world_size: int, worker: int, num_workers: int) -> None:
        super().__init__()
        self.urls, self.seed = urls, seed
        self.slot, self.slots = rank * num_workers + worker, world_size * num_workers

    def __iter__(self) -> Iterator[dict[str, str]]:
        for repeat in range(1 << 30):
            order = list(self.urls)
            random.Random(_mix_seed(self.seed, repeat)).shuffle(order)
            for url in order[self.slot :: self.slots]:
                yield {"url": url}


class WebDatasetTrainStream(IterableDataset):
    """Training batches streamed from tar shards, a fixed number per epoch on every rank.

    Pipeline per DataLoader worker (open_clip's recipe): shards resampled with replacement
    (``resampled=True``; or, with ``resampled=False``, a per-epoch shuffled partition of the shards
    over rank x worker, which needs at least ``world_size * num_workers`` shards) -> tar samples ->
    shuffle buffer -> decode + ``transform`` -> ``batched(batch_size)`` -> ``with_epoch`` of
    ``batches_per_worker``. ``len()`` is the number of batches one rank yields per epoch:
    ``ceil(ceil(epoch_samples / (batch_size * world_size)) / workers) * workers``.

    Seeds depend only on ``(seed, epoch, rank, worker)``, so a run is reproducible and every epoch
    differs; set :attr:`epoch` before each epoch (:class:`WebDataModule` does). Use it with
    ``DataLoader(stream, batch_size=None, num_workers=num_workers)`` and the same ``num_workers``.

    Args:
        urls: shard paths (or anything :func:`resolve_shards` accepts).
        transform: PIL image -> tensor.
        batch_size: per-rank batch size.
        epoch_samples: samples per epoch summed over all ranks.
        num_workers: DataLoader workers that will read this stream (0 = main process).
        rank, world_size: default to the initialised process group (or ``RANK``/``WORLD_SIZE``).
        shuffle_buffer: samples held by the shuffle buffer (per worker).
        resampled: draw shards with replacement (any number of shards) or partition them.
        seed: base seed.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        transform: Callable,
        batch_size: int,
        epoch_samples: int,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.urls = resolve_shards(urls).paths if isinstance(urls, str) else [str(u) for u in urls]
        if not self.urls:
            raise DataConfigError("data.train: the stream has no shards")
        if batch_size < 1 or epoch_samples < 1:
            raise DataConfigError(f"batch_size and epoch_samples must be >= 1, got {batch_size}, {epoch_samples}")
        default_rank, default_world = _rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.transform = transform
        self.batch_size = batch_size
        self.epoch_samples = epoch_samples
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.seed = seed
        self.epoch = 0
        workers = max(1, num_workers)
        if not resampled and len(self.urls) < self.world_size * workers:
            raise DataConfigError(
                f"data.train: {len(self.urls)} shards cannot be partitioned over {self.world_size} ranks x "
                f"{workers} workers (every one must get a shard, or a rank stalls and DDP hangs); write more "
                "shards (tools/make_shards.py --maxcount), use fewer workers, or set resampled: true"
            )
        batches_per_rank = math.ceil(epoch_samples / (batch_size * self.world_size))
        self.batches_per_worker = math.ceil(batches_per_rank / workers)

    def __len__(self) -> int:
        return self.batches_per_worker * max(1, self.num_workers)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def pipeline(self, worker: int, num_workers: int) -> wds.DataPipeline:
        """The webdataset pipeline of one worker of this rank for the current epoch."""
        seed = _mix_seed(self.seed, self.epoch, self.rank, worker)
        if self.resampled:
            shards: IterableDataset = wds.ResampledShards(
                self.urls, seed=seed, worker_seed=lambda: 0, deterministic=True
            )
        else:
            shards = _EpochShards(self.urls, _mix_seed(self.seed, self.epoch), self.rank, self.world_size, worker, num_workers)
        return wds.DataPipeline(
            shards,
            wds.tarfile_to_samples(),
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), seed=seed)
            if self.shuffle_buffer > 1
            else None,
            wds.map(_DecodeTransform(self.transform)),
            wds.batched(self.batch_size, collation_fn=stream_collate, partial=False),
        ).with_epoch(self.batches_per_worker)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != max(1, self.num_workers):
            raise RuntimeError(
                f"WebDatasetTrainStream was sized for {self.num_workers} workers but runs in a DataLoader with "
                f"{num_workers}; pass the same num_workers to both"
            )
        return iter(self.pipeline(worker, num_workers))


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class StreamLoader(DataLoader):
    """DataLoader of a :class:`WebDatasetTrainStream` that sets the stream's epoch at every ``iter``
    (Lightning calls ``set_epoch`` only on samplers, which iterable datasets do not have)."""

    def __init__(self, stream: WebDatasetTrainStream, epoch_fn: Callable[[], int] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("batch_size", None)
        kwargs["persistent_workers"] = False  # workers must be re-created to see the new epoch
        super().__init__(stream, num_workers=stream.num_workers, **kwargs)
        self.epoch_fn = epoch_fn

    def __iter__(self):  # noqa: ANN204 - DataLoader's iterator type is private
        if self.epoch_fn is not None:
            self.dataset.set_epoch(self.epoch_fn())
        return super().__iter__()


# ------------------------------------------------------------------------------------ datamodule


@dataclass
class StreamConfig:
    """How ``data.train`` is streamed.

    Attributes:
        epoch_samples: samples per epoch over all ranks (default: the size of ``data.train``).
        shuffle_buffer: per-worker shuffle buffer, in samples.
        resampled: draw shards with replacement (open_clip's default) or partition them per epoch.
    """

    epoch_samples: int | None = None
    shuffle_buffer: int = 1000
    resampled: bool = True


class WebDataModule(OODDataModule):
    """:class:`~robustft.data.OODDataModule` whose ``train`` set is streamed from webdataset shards.

    Evaluation sets (``test``, ``val``, ``ood``, and the KNN/MDS reference bank built from ``train``)
    stay map-style, so distributed evaluation still counts every sample once. (To train map-style on
    shards, use ``OODDataModule`` with ``source: webdataset``.) Mid-epoch resume of a stream restarts
    the interrupted epoch's stream (same seed); resume is exact at epoch boundaries only.

    Args:
        val_fraction: defaults to 0 here: a stream reads every training shard, so an ID validation set
            must be given as ``val``.
        stream: streaming options (:class:`StreamConfig`; defaults when omitted).
        **kwargs: the other arguments of :class:`~robustft.data.OODDataModule` (``ood``, ``batch_size``, ...).
    """

    def __init__(
        self,
        train: DatasetSpec,
        test: DatasetSpec,
        val: DatasetSpec | None = None,
        val_fraction: float = 0.0,
        stream: StreamConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(train, test, val=val, val_fraction=val_fraction, **kwargs)
        self.stream = StreamConfig() if stream is None else stream
        if isinstance(self.stream, dict):
            self.stream = StreamConfig(**self.stream)
        train_spec = train if isinstance(train, DatasetSpec) else DatasetSpec(**train)
        if train_spec.source != "webdataset":
            raise DataConfigError(
                f"data.train.source: WebDataModule streams webdataset shards, got '{train_spec.source}'; "
                "use OODDataModule for other sources"
            )
        if train_spec.max_samples is not None or train_spec.exclude_classes:
            raise DataConfigError(
                "data.train: max_samples / exclude_classes cannot be applied to a stream; write the subset "
                "as its own shards (tools/make_shards.py --max-samples)"
            )
        if val is None and val_fraction > 0:
            raise DataConfigError(
                "data.val_fraction: a streamed training set cannot hold out a validation split; give data.val "
                "or set val_fraction: 0"
            )
        self._train_spec = train_spec

    def train_stream(self) -> WebDatasetTrainStream:
        trainer = getattr(self, "trainer", None)
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else _rank_world()
        epoch_samples = self.stream.epoch_samples or len(self.train_images)
        return WebDatasetTrainStream(
            resolve_shards(self._train_spec.path, "data.train").paths,
            train_transform(self.resolve_preprocess(), self.augmentation),
            batch_size=self.batch_size,
            epoch_samples=epoch_samples,
            num_workers=self.num_workers,
            rank=rank,
            world_size=world_size,
            shuffle_buffer=self.stream.shuffle_buffer,
            resampled=self.stream.resampled,
            seed=self.seed,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        epoch_fn = (lambda: trainer.current_epoch) if trainer is not None else None
        return StreamLoader(self.train_stream(), epoch_fn=epoch_fn)
