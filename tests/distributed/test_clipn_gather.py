"""CLIPN under DDP: L_yes, L_no and L_tso are computed on the all-gathered global batch.

Two gloo processes each encode half of one batch and gather the image, yes and no features with
``all_gather(sync_grads=True)``. Each rank's losses must equal the one-process losses on the whole batch,
and the gradients DDP averages across ranks (no tower and no-prompts) must equal the one-process
gradients: otherwise L_no would miss the other rank's unmatched pairs, or their gradients would be lost.
The per-sample prompt draw is fixed (the same global draw, sliced per rank), so that the comparison is
exact while the samples still use different prompts (one caption template: no template draw either).
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

from robustft.methods.clipn import CLIPN

MICRO = "robustft-micro-vit"
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCH = 8
#: the prompt option of each sample of the global batch (0..3: a prompt, 4: their mean)
CHOICES = torch.tensor([0, 4, 1, 2, 3, 0, 4, 2])


def _model(gather: bool = True, choices: torch.Tensor = CHOICES) -> CLIPN:
    torch.manual_seed(0)
    with warnings.catch_warnings():  # random init is the point here: only the arithmetic is compared
        warnings.simplefilter("ignore")
        model = CLIPN(MICRO, class_names=NAMES, templates=["a photo of a {}."],
                      n_prompts=4, gather_distributed=gather)
    with torch.no_grad():  # away from the identity start, so that every term has a gradient of its own
        model.prompt_no.normal_(std=0.3, generator=torch.Generator().manual_seed(1))
        model.no_tower.text_projection.mul_(1.5)
    model.prompt_choices = lambda n: choices  # type: ignore[method-assign]
    model.log = lambda *args, **kwargs: None  # no Trainer to log to
    return model.train()


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return {"image": torch.randn(BATCH, 3, 32, 32, generator=generator), "label": torch.tensor([0, 1, 2, 3, 4, 5, 1, 3])}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world_size: int, port: int, out: str, gather: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        half = BATCH // world_size
        model = _model(gather, CHOICES[rank * half : (rank + 1) * half])
        # the two things training_losses needs from a Trainer: its world size and the DDP all_gather
        model._trainer = SimpleNamespace(world_size=world_size, strategy=DDPStrategy())
        local = {k: v[rank * half : (rank + 1) * half] for k, v in _batch().items()}
        losses = model.training_losses(local)
        CLIPN.total_loss(losses).backward()
        grads = _grads(model)
        for grad in grads.values():  # what DDP's reducer does: mean over ranks
            dist.all_reduce(grad)
            grad /= world_size
        torch.save({"losses": {k: v.detach() for k, v in losses.items()}, "grads": grads}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_ddp(tmp_path: Path, gather: bool) -> list[dict]:
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path), gather), nprocs=2, join=True,
                       start_method="fork")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_gathered_losses_and_gradients_equal_one_process_on_the_global_batch(tmp_path: Path) -> None:
    reference = _model()
    losses = reference.training_losses(_batch())
    CLIPN.total_loss(losses).backward()
    expected = _grads(reference)
    assert set(expected) == {n for n, p in reference.named_parameters() if p.requires_grad}  # no tower + prompts
    assert not any(n.startswith("backbone.") for n in expected)
    assert all(expected["prompt_no"][i].abs().sum() > 0 for i in range(4))  # every prompt was drawn

    ranks = _run_ddp(tmp_path, gather=True)
    for result in ranks:
        assert result["losses"].keys() == losses.keys()
        for name, value in losses.items():
            torch.testing.assert_close(result["losses"][name], value.detach(), rtol=0, atol=1e-6, msg=name)
        assert result["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_without_gathering_each_rank_sees_only_its_local_pairs(tmp_path: Path) -> None:
    """The control: gather_distributed false gives a different (local, smaller-batch) L_no per rank."""
    full = _model().training_losses(_batch())["itbo_no"].detach()
    ranks = _run_ddp(tmp_path, gather=False)
    assert not torch.allclose(ranks[0]["losses"]["itbo_no"], ranks[1]["losses"]["itbo_no"])
    for result in ranks:
        assert abs(float(result["losses"]["itbo_no"] - full)) > 1e-3
