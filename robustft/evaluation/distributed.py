"""Exact distributed evaluation: every sample counted once, whatever the number of processes.

Lightning's ``DistributedSampler`` pads ranks with repeated samples to equal length, which silently
changes OOD metrics. Here each rank reads a disjoint, unpadded shard (``rank::world_size``), outputs
are gathered with their sample indices, and every rank ends up with the full, ordered result.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` outside distributed runs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: disjoint across ranks, no padding, no shuffling."""

    def __init__(self, length: int, rank: int | None = None, world_size: int | None = None) -> None:
        default_rank, default_world = world()
        self.length = length
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


class UnpaddedDistributedSampler(DistributedSampler):
    """:class:`ShardSampler`'s indices (``rank::world_size``, no padding) as a ``DistributedSampler``.

    Lightning replaces the sampler of every evaluation loader that is not a ``DistributedSampler`` with
    its own, which pads the ranks with repeats of the first samples; those repeats would count twice in
    ``val/acc`` / ``test/acc``. Being a ``DistributedSampler`` subclass, this one is kept as it is. Ranks
    may then run different numbers of batches, so evaluation steps must not run collectives (the metrics
    are reduced once, at the end of the epoch: ``OODMethod._log_eval_sums``)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.shard = ShardSampler(len(dataset), rank, num_replicas)  # type: ignore[arg-type]
        self.num_samples = len(self.shard)

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard)

    def __len__(self) -> int:
        return len(self.shard)


def _all_gather_uneven(tensor: Tensor) -> list[Tensor]:
    """all_gather for tensors whose first dimension differs between ranks (pads, then trims)."""
    _, world_size = world()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return [g[: int(s.item())] for g, s in zip(gathered, sizes, strict=True)]


def gather_by_index(outputs: dict[str, Tensor], backend_device: torch.device | None = None) -> dict[str, Tensor]:
    """Gather a dict of per-sample tensors (which must hold ``index``) from all ranks, sorted by index.

    Raises if an index is missing or duplicated, so a sampler bug can never pass as a metric.
    """
    _, world_size = world()
    if world_size > 1:
        device = backend_device or torch.device("cpu")
        merged: dict[str, Tensor] = {}
        for key, value in outputs.items():
            parts = _all_gather_uneven(value.to(device))
            merged[key] = torch.cat(parts).cpu()
        outputs = merged
    order = torch.argsort(outputs["index"])
    ordered = {key: value[order] for key, value in outputs.items()}
    index = ordered["index"]
    if len(index) and not torch.equal(index, torch.arange(len(index), device=index.device)):
        raise RuntimeError(
            "distributed evaluation lost or duplicated samples: gathered indices are not 0..N-1 "
            f"(got {len(index)} samples, {len(torch.unique(index))} unique)"
        )
    return ordered
