"""The unlabelled training stream (``data.unlabeled``), delivered next to the labelled one.

Layout: with ``data.unlabeled`` set, ``OODDataModule.train_dataloader`` returns
``CombinedLoader({"labeled": ..., "unlabeled": ...}, mode="min_size")`` and a training batch is
``{"labeled": <the usual labelled batch>, "unlabeled": {"image", "true_label", "index", "source"}}``.

Why ``min_size`` with an endless unlabelled stream (and not ``max_size_cycle``): the labelled loader
alone defines the epoch, exactly as without an unlabelled stream, so ``max_epochs``, schedules
(``estimated_stepping_batches``), validation and the labelled loader's exact resume are unchanged.
The unlabelled stream (:class:`UnlabeledStream`) never ends: it runs through its own epochs one after
the other, across trainer epochs, each a fresh seeded permutation of all unlabelled samples, so every
unlabelled sample is seen exactly once per unlabelled epoch whatever the two sizes are (an unlabelled
set much larger than the labelled one, as in DRO/RSS, is not re-started at every labelled epoch, and a
smaller one is cycled without truncating a pass). ``max_size_cycle`` would instead let the larger set
define the epoch (a different epoch length for every method using the stream) and restart the shorter
loader mid-pass at each epoch end.

Resume: unlabelled epoch ``u``'s order is ``randperm(N, seed=mix(seed, u))`` sharded ``rank::world_size``,
so the stream's whole state is one counter, the number of unlabelled batches trained on so far.
:class:`UnlabeledLoader` counts the batches it hands to the trainer; the datamodule saves the count in
checkpoints (``state_dict()["unlabeled_loader"]``) and a resumed loader starts there. Random
augmentations of unlabelled images draw from the global RNG right after the labelled batch's (with
``num_workers: 0``), which the labelled loader restores (robustft/data/resumable.py), so they are exact
too; with DataLoader workers they are not (as for the labelled stream).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, get_worker_info

from robustft.data.sources import DataConfigError, LabeledImages
from robustft.data.transforms import apply_views

#: what :class:`UnlabeledLoader` reports as its length: it never ends, and ``min_size`` follows the labelled loader
ENDLESS = 2**62


def _mix_seed(*values: int) -> int:
    digest = hashlib.sha256(("unlabeled," + ",".join(str(int(v)) for v in values)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class UnlabeledImages(Dataset):
    """Several image sets as one: ``{"image", "true_label", "index", "source"}`` samples.

    ``index`` is the position in the concatenation (sets in config order), ``source`` the set's
    position in ``names``; ``true_label`` is the source's label, for diagnostics only (never train on it).
    ``image`` is ``[C, H, W]``, or ``[V, C, H, W]`` with ``n_views`` = V > 1.
    """

    def __init__(
        self, sets: Sequence[LabeledImages], transform: Callable, n_views: int = 1, names: Sequence[str] | None = None
    ) -> None:
        self.sets = list(sets)
        self.names = list(names) if names is not None else [str(i) for i in range(len(self.sets))]
        self.transform = transform
        self.n_views = n_views
        self.offsets = np.cumsum([0, *(len(s) for s in self.sets)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict:
        source = int(np.searchsorted(self.offsets, index, side="right") - 1)
        image, label = self.sets[source][int(index - self.offsets[source])]
        return {
            "image": apply_views(self.transform, image, self.n_views),
            "true_label": label,
            "index": int(index),
            "source": source,
        }


class UnlabeledStream(IterableDataset):
    """Endless batches of ``dataset``: epoch ``u`` visits this rank's shard of a seeded permutation.

    Batch ``k`` of this rank is batch ``k % batches_per_epoch`` of unlabelled epoch ``k // batches_per_epoch``;
    the last batch of an epoch may be smaller (no sample is dropped or repeated within an epoch).
    Iteration starts at batch :attr:`start`; DataLoader worker ``w`` of ``W`` yields batches
    ``start + w``, ``start + w + W``, ... (the DataLoader returns them in order).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.start = 0
        local = len(range(rank, len(dataset), world_size))
        if local == 0:
            raise DataConfigError(
                f"data.unlabeled: {len(dataset)} unlabelled samples cannot be shared by {world_size} processes "
                "(every process needs at least one); add samples or use fewer processes"
            )
        self.batches_per_epoch = -(-local // batch_size)
        self._epoch_cache: tuple[int, torch.Tensor] | None = None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's sample order in unlabelled epoch ``epoch``."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
            order = torch.randperm(len(self.dataset), generator=generator)[self.rank :: self.world_size]
            self._epoch_cache = (epoch, order)
        return self._epoch_cache[1]

    def batch_indices(self, k: int) -> list[int]:
        """Sample indices of this rank's ``k``-th batch of the stream."""
        epoch, position = divmod(k, self.batches_per_epoch)
        return self.epoch_order(epoch)[position * self.batch_size : (position + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        k = self.start + worker
        while True:
            yield default_collate([self.dataset[i] for i in self.batch_indices(k)])
            k += workers


class UnlabeledLoader(DataLoader):
    """DataLoader of an :class:`UnlabeledStream` that counts the batches it delivers and starts each new
    iteration (each trainer epoch, or a resumed run) where the previous one stopped.

    Args:
        stream: the stream.
        resume_state: ``{"batches_done": n}`` from :meth:`position` of the interrupted run, or ``None``.
        num_workers: DataLoader workers (not persistent: each iteration's workers start at the count).
    """

    def __init__(
        self,
        stream: UnlabeledStream,
        resume_state: dict[str, Any] | None = None,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("batch_size", None)
        kwargs["persistent_workers"] = False
        # its own generator: creating an iterator must not draw from the global RNG (augmentations)
        kwargs.setdefault("generator", torch.Generator().manual_seed(stream.seed))
        super().__init__(stream, num_workers=num_workers, **kwargs)
        self.batches_done = int(resume_state["batches_done"]) if resume_state else 0

    def __len__(self) -> int:
        return ENDLESS

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        self.dataset.start = self.batches_done
        return self._counted(super().__iter__())

    def _counted(self, iterator: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in iterator:
            self.batches_done += 1
            yield batch

    def position(self) -> dict[str, Any]:
        """What a checkpoint saves: the unlabelled batches delivered so far (all epochs)."""
        stream = self.dataset
        return {
            "batches_done": self.batches_done,
            "batches_per_epoch": stream.batches_per_epoch,
            "samples": len(stream.dataset),
            "world_size": stream.world_size,
        }
