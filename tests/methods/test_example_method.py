"""docs/adding_a_method.md's worked example (tests/methods/example_method.py), run on real data.

The doc embeds the example file verbatim (checked here, so it cannot go stale); the method trains with
two views and an unlabelled stream, one optimizer step per view, its loss goes down on real CIFAR-10,
its gradients are clipped, its parameter groups reach the optimizer, and the real CLI runs it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml

from robustft.cli import main
from robustft.data import OODDataModule

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DOC = REPO / "docs" / "adding_a_method.md"
EXAMPLE = HERE / "example_method.py"
DATA = {
    "train": {"source": "npz", "path": str(REPO / "data/cifar10/cifar10_train_5k_jpeg.npz"), "max_samples": 384},
    "test": {"source": "npz", "path": str(REPO / "data/cifar10/cifar10_test_2k.npz"), "max_samples": 100},
    "ood": {"far": {"dtd": {"source": "npz", "path": str(REPO / "data/dtd/dtd_10class_32.npz"), "max_samples": 50}}},
    "unlabeled": {"tin": {"source": "npz", "path": str(REPO / "data/tinyimagenet/tin_test_32.npz"),
                          "max_samples": 400}},
}


@pytest.fixture(autouse=True)
def _example_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.chdir(REPO)


def test_doc_embeds_the_example_verbatim() -> None:
    blocks = re.findall(r"<!-- example_method.py -->\n```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/adding_a_method.md lost its embedded example"
    assert blocks[0] == EXAMPLE.read_text(), "docs/adding_a_method.md and tests/methods/example_method.py differ"


class Spy(pl.Callback):
    """Per optimizer step: the total loss, and the gradient norm before and after the method clips."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.norms_before: list[float] = []
        self.norms_after: list[float] = []
        self.batches = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.batches += 1

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # callbacks run before the module's hook, i.e. before the base class clips
        self.norms_before.append(_grad_norm(pl_module))
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad.detach().flatten() for p in module.parameters() if p.grad is not None]
    return float(torch.cat(grads).norm())


def _example(**kwargs: Any):
    from example_method import TwoViewExample

    class ClipSpy(TwoViewExample):  # records the norm right after the base class clipped
        norms_after: list[float] = []

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            super().on_before_optimizer_step(optimizer)
            self.norms_after.append(_grad_norm(self))

    return ClipSpy(num_classes=10, backbone="cifar_resnet20", scheduler=None,
                   optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}},
                   **kwargs)


@pytest.mark.slow  # 36 optimizer steps of a ResNet-20 from scratch
def test_two_views_unlabelled_stream_manual_steps_loss_down_and_clipped() -> None:
    torch.manual_seed(0)
    model = _example(clip_val=1.0, aux_lr_mult=2.0)  # random backbone: the loss has room to fall
    data = OODDataModule(**DATA, n_views=2, batch_size=64, val_fraction=0.0, augmentation="crop_flip")
    spy = Spy()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[spy])
    trainer.fit(model, datamodule=data)

    assert trainer.global_step == 2 * spy.batches == 2 * 18  # one optimizer step per view, 6 batches x 3 epochs
    assert {"train/ce", "train/aux", "train/entropy", "train/loss"} <= set(trainer.callback_metrics)
    first, last = sum(spy.losses[:6]) / 6, sum(spy.losses[-6:]) / 6
    assert last < first - 0.2, f"loss did not go down: {first:.3f} -> {last:.3f}"
    assert max(spy.norms_before) > 1.0  # clipping had something to do ...
    assert max(model.norms_after) <= 1.0 + 1e-4  # ... and every step was clipped to the norm 1

    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert set(groups) == {"backbone", "head", "aux_head"}
    assert groups["aux_head"]["lr"] == pytest.approx(0.1) and groups["head"]["lr"] == pytest.approx(0.05)


def test_the_real_cli_trains_and_evaluates_the_example(tmp_path: Path) -> None:
    config = {
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1,
                    "num_sanity_val_steps": 0, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "robustft.callbacks.OODEvaluation",
                                   "init_args": {"report_dir": str(tmp_path / "report"), "plots": False}}]},
        "model": {"class_path": "example_method.TwoViewExample",
                  "init_args": {"num_classes": 10, "backbone_weights": "data/weights/resnet20-12fca82f.th",
                                "aux_stage": 1, "scores": ["msp", "knn"]}},
        "data": {"class_path": "robustft.data.OODDataModule",
                 "init_args": {**DATA, "n_views": 2, "batch_size": 32, "eval_batch_size": 100}},
    }
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 4  # 2 batches x 2 views
    report = (tmp_path / "report" / "report.json").read_text()
    assert '"knn"' in report and '"dtd"' in report
