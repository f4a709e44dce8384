"""A training loader that ``fit --ckpt_path last`` resumes exactly, even mid-epoch.

A fresh run draws exactly what ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))``
draws (same order, same augmentations), so results do not change. What a plain loader cannot do is
resume: the generator restarts with the process (the resumed epoch gets the first epoch's order),
Lightning restarts an interrupted epoch's iterator from its first batch, and random augmentations
continue from whatever the global RNG state is. Here

- the batch sampler records the shuffle generator's state before each epoch's permutation and the
  global RNG state before each batch is drawn;
- :func:`train_loader_state` (the datamodule's ``state_dict``, stored in every checkpoint) saves them
  with the number of batches of the current epoch already trained on;
- on resume the datamodule's ``load_state_dict`` hands that state to the next train loader, which
  restores both RNG states and skips the trained batches (drawing indices only, no images) on its
  first iteration.

The state travels through the *datamodule* because Lightning restores a stateful *loader* only when
the loader is created after the loops are restored, and ``configure_optimizers`` calling
``trainer.estimated_stepping_batches`` (as robustft's cosine schedule does) creates it before.

Exactness: the order of samples is always exact (also under DDP, where Lightning's
``DistributedSampler`` is seeded by epoch). Augmentations are exact with ``num_workers: 0`` when the
training step itself draws no random numbers between batches (no dropout); with DataLoader workers
each worker's augmentation RNG restarts at the resumed batch, so augmentations differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

#: how many recent batches keep their "RNG state before the batch" (prefetching looks 1-2 ahead)
_RNG_WINDOW = 4


@dataclass
class _Pending:
    """What the next iteration must restore: skipped batches, shuffle generator and global RNG states."""

    skip: int
    generator_state: Tensor | None
    rng_state: Tensor | None


class ResumableBatchSampler(BatchSampler):
    """``BatchSampler`` that can skip the first batches of an epoch and restore RNG states, once.

    Under DDP Lightning re-instantiates it around its ``DistributedSampler`` (the ``sampler`` argument).
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.pending: _Pending | None = None
        self.generator_before_perm: Tensor | None = None
        self.rng_before_batch: dict[int, Tensor] = {}

    @property
    def generator(self) -> torch.Generator | None:
        return getattr(self.sampler, "generator", None)

    def __iter__(self):  # noqa: ANN204 - a generator of index lists
        pending, self.pending = self.pending, None
        generator = self.generator
        if pending is not None and pending.generator_state is not None and generator is not None:
            generator.set_state(pending.generator_state)
        # the permutation is drawn at the first next() below, from this state
        self.generator_before_perm = generator.get_state() if generator is not None else None
        self.rng_before_batch = {}
        batches = super().__iter__()
        skip = pending.skip if pending is not None else 0
        for _ in range(skip):
            if next(batches, None) is None:
                return
        if pending is not None and pending.rng_state is not None:
            torch.set_rng_state(pending.rng_state)
        for position, batch in enumerate(batches, start=skip):
            self.rng_before_batch[position] = torch.get_rng_state()
            self.rng_before_batch.pop(position - _RNG_WINDOW, None)
            yield batch


class ResumableDataLoader(DataLoader):
    """DataLoader over a :class:`ResumableBatchSampler` that applies a saved position on its first ``iter``.

    Args:
        dataset: the training dataset.
        resume_state: what :func:`train_loader_state` saved (``None`` on a fresh run).
        **kwargs: ``DataLoader`` arguments; ``batch_sampler`` must be a :class:`ResumableBatchSampler`.
            (Under DDP Lightning re-creates the loader with these same arguments around its
            ``DistributedSampler``, so the resume state survives.)
    """

    def __init__(self, dataset: Dataset, resume_state: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.resume_state = resume_state

    def _resumable_sampler(self) -> ResumableBatchSampler:
        if not isinstance(self.batch_sampler, ResumableBatchSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableBatchSampler, got {type(self.batch_sampler)}")
        return self.batch_sampler

    def __iter__(self):  # noqa: ANN204 - DataLoader's iterator types are private
        if self.resume_state is not None:
            self._resumable_sampler().pending = _pending_from_state(self.resume_state)
            self.resume_state = None
        return super().__iter__()

    def position(self, batches_done: int) -> dict[str, Any]:
        """The loader's state after ``batches_done`` trained batches of the current epoch (0 at its end)."""
        sampler = self._resumable_sampler()
        generator = sampler.generator
        return {
            "batches_done": int(batches_done),
            "generator_before_perm": sampler.generator_before_perm,
            "generator": generator.get_state() if generator is not None else None,
            "rng_before_batch": dict(sampler.rng_before_batch),
            "rng": torch.get_rng_state(),
            "iterator_per_epoch": not (self.persistent_workers and self.num_workers > 0),
        }

    # Lightning's "stateful loader" protocol, only so that Lightning knows this loader resumes mid-epoch
    # (the state itself travels through the datamodule, see the module docstring).
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _pending_from_state(state: dict[str, Any]) -> _Pending:
    done = int(state["batches_done"])
    if done > 0:  # mid-epoch: the interrupted epoch's permutation, its RNG state before batch `done`, skip
        rng = state["rng_before_batch"].get(done, state["rng"])
        return _Pending(done, state["generator_before_perm"], rng)
    generator_state = state["generator"]
    if generator_state is not None and state["iterator_per_epoch"]:
        # a new DataLoader iterator draws its base seed from the generator before the permutation
        generator = torch.Generator()
        generator.set_state(generator_state)
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        generator_state = generator.get_state()
    return _Pending(0, generator_state, state["rng"])


def batches_done(trainer: Any) -> int:
    """Batches of the current epoch trained so far (0 once the epoch's last batch was fetched)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return 0 if progress.is_last_batch else int(progress.current.processed)


def train_loader_state(trainer: Any) -> dict[str, Any]:
    """``{"train_loader": position}`` of the trainer's live training loader, plus ``"unlabeled_loader"``
    when it delivers an unlabelled stream next to it (``{"labeled": ..., "unlabeled": ...}``, see
    robustft/data/unlabeled.py); ``{}`` when it has none or it is not a :class:`ResumableDataLoader`
    (e.g. a webdataset stream)."""
    from robustft.data.unlabeled import UnlabeledLoader

    loader = getattr(trainer, "train_dataloader", None) if trainer is not None else None
    state: dict[str, Any] = {}
    if isinstance(loader, dict):
        if isinstance(loader.get("unlabeled"), UnlabeledLoader):
            state["unlabeled_loader"] = loader["unlabeled"].position()
        loader = loader.get("labeled")
    if isinstance(loader, ResumableDataLoader):
        state["train_loader"] = loader.position(batches_done(trainer))
    return state


def resumable_train_loader(
    dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0, resume_state: dict[str, Any] | None = None
) -> ResumableDataLoader:
    """Shuffled training loader (``seed`` seeds the shuffle); ``resume_state`` from :func:`train_loader_state`."""
    generator = torch.Generator().manual_seed(seed)
    batch_sampler = ResumableBatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=False)
    return ResumableDataLoader(
        dataset,
        resume_state=resume_state,
        batch_sampler=batch_sampler,
        generator=generator,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
