"""robustft.training_state under two gloo processes: buffers and queues agree on both ranks and equal
what one process computes on the whole (concatenated) data.

Each rank starts with different buffer values and holds a different, uneven local batch (3 and 5
samples). After one step: averaged / broadcast buffers are identical and equal the one-process value;
class prototypes updated from gathered features equal the update on the concatenated batch; a queue fed
with the local batches (gathered inside ``enqueue``) holds the same entries, slots and pointer on both
ranks as a queue fed the concatenated batch, including a wrap-around.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rft_dist_utils import free_port
from torch import Tensor, nn

from robustft.training_state import (
    LabeledQueue,
    all_gather_cat,
    all_reduce_sum_,
    sync_buffers,
)

pytestmark = pytest.mark.slow

WORLD = 2
SIZES = [3, 5]  # uneven local batches
NUM_CLASSES, DIM, ALPHA = 3, 4, 0.75


def _local_batch(rank: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    n = SIZES[rank]
    start = sum(SIZES[:rank])
    return {
        "features": torch.randn(n, DIM, generator=g),
        "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
        "ids": torch.arange(start, start + n),
    }


def _global_batch() -> dict[str, Tensor]:
    parts = [_local_batch(r) for r in range(WORLD)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class Prototypes(nn.Module):
    """PALM-style state: per-class prototypes moved towards the class mean of the batch by EMA."""

    def __init__(self, start: float) -> None:
        super().__init__()
        self.register_buffer("prototypes", torch.full((NUM_CLASSES, DIM), start))
        self.register_buffer("stats", torch.arange(DIM, dtype=torch.float32) + 10 * start)
        self.register_buffer("steps", torch.tensor(int(start * 100)))

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        sums = torch.zeros(NUM_CLASSES, DIM).index_add_(0, labels, features)
        counts = torch.bincount(labels, minlength=NUM_CLASSES).float()
        present = counts > 0
        means = sums[present] / counts[present, None]
        self.prototypes[present] = ALPHA * self.prototypes[present] + (1 - ALPHA) * means


def _start(rank: int) -> float:
    return 0.25 + rank  # different buffer values per rank


def _queue_steps(queue: LabeledQueue, batch: dict[str, Tensor], **enqueue_kwargs: bool) -> None:
    for shift in (0, 100):  # 8 + 8 entries into 6 slots: the second batch crosses the end
        queue.enqueue(batch["features"] + shift, batch["labels"], batch["ids"] + shift, **enqueue_kwargs)


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # forked child: never enter an OpenMP region the parent initialised
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        local = _local_batch(rank)
        result: dict[str, Tensor] = {}

        gathered = all_gather_cat(local["features"])
        result["gathered"] = gathered

        # 1. buffers that differ per rank, made identical: mean (floats) / rank 0 (integers) ...
        averaged = Prototypes(_start(rank))
        sync_buffers(averaged, ["prototypes", "stats", "steps"])
        result.update({f"mean.{k}": v.clone() for k, v in averaged.state_dict().items()})
        # ... or rank 0's copy of everything
        broadcast = Prototypes(_start(rank))
        sync_buffers(broadcast, mode="broadcast")
        result.update({f"broadcast.{k}": v.clone() for k, v in broadcast.state_dict().items()})
        # only the named buffers move
        partial = Prototypes(_start(rank))
        sync_buffers(partial, ["stats"])
        result["partial.prototypes"] = partial.prototypes.clone()

        # 2. prototypes updated from the gathered batch (after a broadcast of the start values)
        protos = Prototypes(_start(rank))
        sync_buffers(protos, mode="broadcast")
        protos.update(all_gather_cat(local["features"]), all_gather_cat(local["labels"]))
        result["updated.prototypes"] = protos.prototypes.clone()
        # the uneven-safe alternative to a gather: all-reduce per-class sums and counts
        sums = torch.zeros(NUM_CLASSES, DIM).index_add_(0, local["labels"], local["features"])
        counts = torch.bincount(local["labels"], minlength=NUM_CLASSES).float()
        result["class_means"] = all_reduce_sum_(sums) / all_reduce_sum_(counts).clamp_min(1)[:, None]

        # 3. a queue fed with local batches, gathered inside enqueue (the default)
        queue = LabeledQueue(capacity=6, dim=DIM)
        _queue_steps(queue, local)
        result.update({f"queue.{k}": v.clone() for k, v in queue.state_dict().items()})

        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Tensor]]:
    out = tmp_path_factory.mktemp("synced")
    mp.start_processes(
        _worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=True, start_method="fork"
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_every_synced_value_is_identical_on_both_ranks(ranks) -> None:
    r0, r1 = ranks
    assert r0.keys() == r1.keys()
    differ = [k for k in r0 if k != "partial.prototypes" and not torch.equal(r0[k], r1[k])]
    assert not differ, differ
    # a buffer that was not named stays per-rank
    assert not torch.equal(r0["partial.prototypes"], r1["partial.prototypes"])


def test_uneven_gather_equals_the_concatenated_batch(ranks) -> None:
    assert torch.equal(ranks[0]["gathered"], _global_batch()["features"])


def test_averaged_and_broadcast_buffers_equal_the_one_process_values(ranks) -> None:
    one = [Prototypes(_start(r)) for r in range(WORLD)]
    for rank in ranks:
        for name in ("prototypes", "stats"):
            expected = (one[0].state_dict()[name] + one[1].state_dict()[name]) / 2
            assert torch.allclose(rank[f"mean.{name}"], expected, rtol=0, atol=1e-6), name
            assert torch.equal(rank[f"broadcast.{name}"], one[0].state_dict()[name]), name
        # integers cannot be averaged: rank 0's value
        assert torch.equal(rank["mean.steps"], one[0].steps)
        assert torch.equal(rank["broadcast.steps"], one[0].steps)


def test_prototypes_updated_from_gathered_features_equal_one_process_on_the_global_batch(ranks) -> None:
    batch = _global_batch()
    single = Prototypes(_start(0))
    single.update(batch["features"], batch["labels"])
    for rank in ranks:
        assert torch.equal(rank["updated.prototypes"], single.prototypes)
    counts = torch.bincount(batch["labels"], minlength=NUM_CLASSES).float()
    sums = torch.zeros(NUM_CLASSES, DIM).index_add_(0, batch["labels"], batch["features"])
    for rank in ranks:
        assert torch.allclose(rank["class_means"], sums / counts.clamp_min(1)[:, None], atol=1e-6)


def test_queue_fed_with_gathered_batches_equals_the_one_process_queue(ranks) -> None:
    single = LabeledQueue(capacity=6, dim=DIM)
    _queue_steps(single, _global_batch(), gather=False)
    assert int(single.ptr) == 16 % 6 and len(single) == 6
    for rank in ranks:
        for key, value in single.state_dict().items():
            assert torch.equal(rank[f"queue.{key}"], value), key
    # the newest 6 of the 16 entries (ids 100..107), in rank order within a step
    assert single.entries(chronological=True).ids.tolist() == [102, 103, 104, 105, 106, 107]

