"""CMA/FLYP under DDP: the contrastive loss is computed on the all-gathered global batch.

Two gloo processes each encode half of one batch and gather image and text features with
``all_gather(sync_grads=True)``. Each rank's loss must equal the one-process loss on the whole batch, and
the gradients DDP averages across ranks must equal the one-process gradients: otherwise the negatives of
the other rank would be missing (a loss on local pairs only) or their gradients dropped.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy
from rft_dist_utils import free_port

from robustft.methods import ContrastiveFinetune

MICRO = "robustft-micro-vit"
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCH = 8


def _model(gather: bool = True) -> ContrastiveFinetune:
    torch.manual_seed(0)
    with warnings.catch_warnings():  # random init is the point here: only the arithmetic is compared
        warnings.simplefilter("ignore")
        model = ContrastiveFinetune(
            MICRO, class_names=NAMES, lam=0.001, train_template="a photo of a {}.", gather_distributed=gather
        )
    model.log = lambda *args, **kwargs: None  # no Trainer to log to
    return model.train()


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(BATCH, 3, 32, 32, generator=generator),
        "label": torch.tensor([0, 1, 2, 3, 4, 5, 1, 3]),
    }


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world_size: int, port: int, out: str, gather: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = _model(gather)
        # the two things training_losses needs from a Trainer: its world size and the DDP all_gather
        model._trainer = SimpleNamespace(world_size=world_size, strategy=DDPStrategy())
        batch = _batch()
        half = BATCH // world_size
        local = {k: v[rank * half : (rank + 1) * half] for k, v in batch.items()}
        loss = ContrastiveFinetune.total_loss(model.training_losses(local))
        loss.backward()
        grads = _grads(model)
        for grad in grads.values():  # what DDP's reducer does: mean over ranks
            dist.all_reduce(grad)
            grad /= world_size
        torch.save({"loss": loss.detach(), "grads": grads}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_ddp(tmp_path: Path, gather: bool) -> list[dict]:
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path), gather), nprocs=2, join=True,
                       start_method="fork")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_gathered_loss_and_gradients_equal_one_process_on_the_global_batch(tmp_path: Path) -> None:
    reference = _model()
    loss = ContrastiveFinetune.total_loss(reference.training_losses(_batch()))
    loss.backward()
    expected = _grads(reference)
    assert any(n.startswith("backbone.model.visual") for n in expected)  # both towers train
    assert any(n.startswith("backbone.model.transformer") for n in expected)

    ranks = _run_ddp(tmp_path, gather=True)
    for result in ranks:
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=0, atol=1e-6)
        assert result["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_without_gathering_each_rank_sees_only_its_local_negatives(tmp_path: Path) -> None:
    """The control: gather_distributed false gives a different (local, smaller-batch) loss per rank."""
    full = ContrastiveFinetune.total_loss(_model().training_losses(_batch())).detach()
    ranks = _run_ddp(tmp_path, gather=False)
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])
    for result in ranks:
        assert abs(float(result["loss"] - full)) > 1e-3
