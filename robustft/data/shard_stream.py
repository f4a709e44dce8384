"""Training on large data: batches streamed from webdataset shards, and the datamodule that uses them.

:class:`WebDatasetTrainStream` follows open_clip's recipe: resampled shards, a shuffle buffer, decode +
transform, batching inside the dataset, and a fixed number of batches per worker, so every rank takes
the same number of steps per epoch whatever the number of workers. :class:`WebDataModule` selects it for
``data.train``; its evaluation sets stay map-style (:mod:`robustft.data.shard_images`).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from robustft.data.datamodule import OODDataModule

if TYPE_CHECKING:  # webdataset is imported when a stream is built, not by `import robustft`
    import webdataset as wds

from robustft.data.shards import (
    LABEL_KEYS,
    TEXT_KEYS,
    decode_image,
    parse_label,
    pick_image_key,
    resolve_shards,
)
from robustft.data.sources import DataConfigError, DatasetSpec
from robustft.data.transforms import train_transform


def _mix_seed(*values: int) -> int:
    digest = hashlib.sha256(",".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def stream_collate(samples: list[dict]) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        # a stream has no stable sample positions; -1 says so (evaluation never uses streams)
        "index": torch.full((len(samples),), -1, dtype=torch.long),
    }
    texts = [s.get("text") for s in samples]
    if all(t is not None for t in texts):  # CC3M-style .txt captions, as map-style shards give them
        batch["text"] = texts
    return batch


class _DecodeTransform:
    """Sample dict from a tar -> ``{"image": transformed tensor, "label": int[, "text": caption]}`` (picklable)."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image_key = pick_image_key([k for k in sample if not k.startswith("__")])
        if image_key is None:
            raise ValueError(f"sample '{sample.get('__key__')}' of '{sample.get('__url__')}' has no image member")
        label = next((parse_label(sample[k]) for k in LABEL_KEYS if k in sample), 0)
        decoded = {"image": self.transform(decode_image(sample[image_key])), "label": label}
        text = next((sample[k] for k in TEXT_KEYS if k in sample), None)
        if text is not None:
            decoded["text"] = (text.decode("utf-8") if isinstance(text, bytes) else str(text)).strip()
        return decoded


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
        import webdataset as wds

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
        # the stream replaces OODDataModule's training loader, so these options would be ignored silently
        unsupported = {
            "data.n_views": self.n_views != 1,
            "data.shots_per_class": self.shots_per_class is not None,
            "data.unlabeled": bool(self.unlabeled_specs),
        }
        refused = [name for name, given in unsupported.items() if given]
        if refused:
            raise DataConfigError(
                f"{', '.join(refused)}: not supported by WebDataModule's streamed training set; use "
                "OODDataModule with source: webdataset (map-style shards) for these options"
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
