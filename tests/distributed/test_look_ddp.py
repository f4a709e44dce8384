"""LOOK under DDP: keys, labels and ids are gathered across ranks before they are used and enqueued.

Two gloo processes each take half of one batch. After two steps, both ranks must hold the same queue,
equal to the queue one process builds from the whole batches (the global batch, in rank order), and the
mean of the two ranks' losses must equal the one-process loss: each query saw the other rank's keys as
candidates. BatchNorm runs in eval mode so that a sample's embedding does not depend on which samples
share its (local) batch; everything else is the training path (EMA update, gather, loss, enqueue).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rft_dist_utils import free_port

from robustft.methods.look import LOOK

pytestmark = pytest.mark.slow
BATCH = 8


def _model() -> LOOK:
    torch.manual_seed(0)
    return LOOK(num_classes=3, k=5, queue_size=12, proj_dim=16, momentum=0.5).eval()


def _batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.arange(BATCH) + step * BATCH
    return {"image": torch.randn(BATCH, 2, 3, 32, 32, generator=g), "label": ids % 3, "index": ids}


def _step(model: LOOK, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = model.training_losses(batch)["look"]
    loss.backward()
    with torch.no_grad():  # identical plain SGD step on every rank (gradients averaged below)
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-0.1)
                p.grad = None
    return loss.detach()


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = _model()
        half = BATCH // world_size
        losses = []
        for step in range(2):
            batch = {k: v[rank * half : (rank + 1) * half] for k, v in _batch(step).items()}
            loss = model.training_losses(batch)["look"]
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:  # what DDP's reducer does: mean over ranks
                        dist.all_reduce(p.grad)
                        p.add_(p.grad / world_size, alpha=-0.1)
                        p.grad = None
            losses.append(loss.detach())
        queue = {k: v.clone() for k, v in model.queue.state_dict().items()}
        torch.save({"losses": torch.stack(losses), "queue": queue}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_enqueue_the_global_batch_and_see_each_others_keys(tmp_path: Path) -> None:
    reference = _model()
    ref_losses = torch.stack([_step(reference, _batch(step)) for step in range(2)])
    ref_queue = reference.queue.state_dict()
    assert ref_queue["ids"].tolist() == [*range(12, 16), *range(4, 12)]  # 16 keys in 12 slots: wrapped

    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in ranks:
        for key in ("labels", "ids", "ptr", "num_filled"):
            assert torch.equal(result["queue"][key], ref_queue[key]), key
        torch.testing.assert_close(result["queue"]["keys"], ref_queue["keys"], rtol=0, atol=1e-5)
    assert torch.equal(ranks[0]["queue"]["keys"], ranks[1]["queue"]["keys"])  # one queue on every rank
    torch.testing.assert_close((ranks[0]["losses"] + ranks[1]["losses"]) / 2, ref_losses, rtol=0, atol=1e-5)
