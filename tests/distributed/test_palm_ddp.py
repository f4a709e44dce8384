"""PALM under DDP: prototypes are updated from the all-gathered global batch.

The second test runs the real CLI with ``strategy: ddp`` on 2 CPU processes: after the last step both
ranks hold bit-for-bit the same prototypes (the last update happens after DDP's last buffer broadcast,
so a rank-local update would show), and ``last.ckpt`` holds exactly them.

Two gloo processes hold different, uneven shards (3 and 5 images, two views each) of one batch and take
two SGD steps (gradients averaged as DDP's reducer does). After every step both ranks must hold bit-for-
bit the same prototypes, equal to one process stepping on the concatenated batch; the averaged gradients
must equal the one-process gradients (the MLE term is scaled per shard, the prototype-contrastive term's
local gradient path by the world size). BatchNorm runs in eval mode so that a sample's embedding does
not depend on which shard it is in (per-shard batch statistics would differ from the whole batch's in
any DDP run without SyncBatchNorm; that is not what is tested here). A rank that updated its
prototypes from its local shard only (OpenOOD's port) would disagree with the other rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rft_dist_utils import callback, free_port, run_cli, tiny_config, write_config
from torch import nn

from robustft.methods.palm import PALM
from robustft.methods.palm.prototypes import assignment_weights, class_mask, ema_update, sinkhorn

pytestmark = pytest.mark.slow

SIZES = [3, 5]
STEPS = 2


def _model() -> PALM:
    torch.manual_seed(0)
    model = PALM(num_classes=10, prototypes_per_class=3, top_k=2, momentum=0.5)
    model.log = lambda *args, **kwargs: None
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    return model


def _batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    n = sum(SIZES)
    return {"image": torch.randn(n, 2, 3, 32, 32, generator=g), "label": torch.randint(0, 10, (n,), generator=g)}


def _run(rank: int | None, world: int) -> dict:
    """Steps on this rank's shard (``rank=None``: one process on the whole batch)."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    out: dict = {"prototypes": [], "grads": [], "local_only": []}
    for step in range(STEPS):
        batch = _batch(step)
        if rank is not None:
            start = sum(SIZES[:rank])
            batch = {k: v[start : start + SIZES[rank]] for k, v in batch.items()}
            with torch.no_grad():  # what a rank-local update (no gather) would give
                z = model(batch["image"].flatten(0, 1)).reshape(len(batch["label"]), 2, -1)
                z = torch.cat(z.unbind(1))
                mask = class_mask(batch["label"].repeat(2), model.prototype_classes)
                w = assignment_weights(sinkhorn(z, model.prototypes), mask, model.top_k)
                out["local_only"].append(ema_update(model.prototypes, z, w, 0.5).clone())
        loss = sum(model.training_losses(batch).values())
        optimizer.zero_grad()
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        if rank is not None:
            for name, grad in grads.items():  # DDP's reducer: mean over ranks
                dist.all_reduce(grad)
                grad /= world
                dict(model.named_parameters())[name].grad.copy_(grad)
        optimizer.step()
        out["prototypes"].append(model.prototypes.clone())
        out["grads"].append(grads)
    return out


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_run(rank, world), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_prototypes_identical_on_both_ranks_and_equal_to_one_process(tmp_path: Path) -> None:
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _run(None, 1)
    finally:  # restored: later tests compare thread-count-sensitive stored reports
        torch.set_num_threads(threads)
    for step in range(STEPS):
        assert torch.equal(ranks[0]["prototypes"][step], ranks[1]["prototypes"][step]), step
        torch.testing.assert_close(ranks[0]["prototypes"][step], single["prototypes"][step], atol=1e-6, rtol=1e-5)
        for name, grad in single["grads"][step].items():
            torch.testing.assert_close(ranks[0]["grads"][step][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # the control: updating from the local shard only leaves the two ranks with different prototypes
    assert not torch.allclose(ranks[0]["local_only"][0], ranks[1]["local_only"][0], atol=1e-4)


class SavePrototypes(pl.Callback):
    """(Loaded by the CLI subprocesses from YAML.) Save each rank's prototypes at the end of fit."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: PALM) -> None:
        torch.save(pl_module.prototypes.detach().cpu().clone(), Path(self.folder) / f"protos{trainer.global_rank}.pt")


def test_cli_ddp_fit_keeps_the_prototypes_identical_and_checkpoints_them(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "run", devices=2, strategy="ddp", scores=("mahalanobis_global",), callbacks=[
        callback("test_palm_ddp.SavePrototypes", folder=str(tmp_path)),
        callback("lightning.pytorch.callbacks.ModelCheckpoint", dirpath=str(tmp_path / "ckpt"), save_last=True),
    ], trainer={"limit_val_batches": 0}, data={"n_views": 2, "augmentation": "simclr"})
    config["model"] = {"class_path": "robustft.methods.palm.PALM", "init_args": {
        "num_classes": 10, "backbone_weights": "data/weights/resnet20-12fca82f.th", "momentum": 0.5,
        "scores": ["mahalanobis_global"],
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01}}}}
    run_cli("fit", "--config", str(write_config(tmp_path / "fit.yaml", config)))
    ranks = [torch.load(tmp_path / f"protos{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0], ranks[1])
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(state["prototypes"], ranks[0])
    assert not torch.allclose(ranks[0], PALM(num_classes=10).prototypes)  # the EMA moved them
