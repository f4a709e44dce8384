"""A training loader that ``fit --ckpt_path last`` resumes exactly, even mid-epoch.

A plain ``DataLoader(shuffle=True, generator=...)`` cannot be resumed exactly: the generator restarts
with the process (so the resumed epoch gets another order), Lightning restarts an interrupted epoch's
iterator from its first batch, and random augmentations draw from the global RNG, whose state moved on
with batches that were prefetched but never trained on. Here instead

- the order of epoch ``e`` depends only on ``(seed, e)`` (a ``DistributedSampler``, so under DDP it
  also splits the data over ranks and Lightning does not wrap it again);
- on resume, the sampler skips the batches the checkpoint had already trained on in that epoch
  (read from the trainer's restored loop progress when the loader is built);
- the augmentation of sample ``i`` in epoch ``e`` is drawn from an RNG seeded by ``(seed, e, i)``,
  independent of batch order, prefetching and the number of workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from robustft.data.datamodule import IndexedDataset
from robustft.data.sources import LabeledImages


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    digest = hashlib.sha256(",".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ResumableSampler(DistributedSampler):
    """Per-epoch shuffled indices from ``(seed, epoch)``, split over ranks, yielded as ``(epoch, i)``.

    :meth:`resume_at` makes the next iteration of that epoch start after the samples already trained on.
    """

    def __init__(
        self, dataset: Sized, seed: int = 0, num_replicas: int = 1, rank: int = 0, shuffle: bool = True
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, samples_done: int) -> None:
        """Skip the first ``samples_done`` samples (of this rank) of epoch ``epoch``, once."""
        self._resume = (epoch, samples_done) if samples_done > 0 else None

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())
        if self._resume is not None and self._resume[0] == self.epoch:
            _, done = self._resume
            self._resume = None
            if done < len(indices):  # done == len: the epoch had ended; Lightning starts the next one
                indices = indices[done:]
        epoch = self.epoch
        return iter([(epoch, i) for i in indices])


class SeededIndexedDataset(IndexedDataset):
    """:class:`IndexedDataset` whose random transform of ``(epoch, position)`` is seeded by
    ``(seed, epoch, position)``; plain integer keys use epoch 0."""

    def __init__(
        self, images: LabeledImages, transform: Callable, indices: np.ndarray | None = None, seed: int = 0
    ) -> None:
        super().__init__(images, transform, indices)
        self.seed = seed

    def __getitem__(self, key: Any) -> dict:
        epoch, position = key if isinstance(key, tuple) else (0, key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, position))
            return super().__getitem__(position)


def resume_position(trainer: Any) -> tuple[int, int]:
    """``(epoch, batches already trained in it)`` the fit loop will continue from (``(0, 0)`` on a fresh
    run). Valid when the loader is requested, i.e. after Lightning restored the checkpoint's loops."""
    fit_loop = getattr(trainer, "fit_loop", None) if trainer is not None else None
    if fit_loop is None:
        return 0, 0
    epoch = int(fit_loop.epoch_progress.current.processed)
    done = int(fit_loop.epoch_loop.batch_progress.current.processed) if fit_loop.restarting else 0
    return epoch, done


def resumable_train_loader(
    dataset: IndexedDataset,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    trainer: Any = None,
) -> DataLoader:
    """Shuffled training loader over ``dataset`` that resumes exactly from the trainer's restored state."""
    rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    seeded = SeededIndexedDataset(dataset.images, dataset.transform, dataset.indices, seed)
    sampler = ResumableSampler(seeded, seed=seed, num_replicas=world_size, rank=rank)
    epoch, batches_done = resume_position(trainer)
    sampler.set_epoch(epoch)
    sampler.resume_at(epoch, batches_done * batch_size)
    return DataLoader(
        seeded,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        drop_last=False,
    )
