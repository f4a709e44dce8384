"""DROSSL (RSS robust self-training): the spec's CPU-checkable properties (section 5(g)) and the real CLI.

- T = 0 and lambda = 0 give exactly ERM (loss and gradients), whatever the perturbation space;
- the inner ascent never lowers the surrogate for a small step; ||z - x|| shrinks as gamma grows;
- the unlabelled term's gradient equals the one computed with pseudo-labels precomputed under no_grad
  (independent re-implementation here), for hard, soft and labelled-model pseudo-labels;
- BatchNorm / dropout: eval mode inside the inner loop, each module's own mode restored after;
- the unlabelled stream is cycled through the trainer's epochs, not truncated;
- a micro ``fit`` through the real CLI, then ``evaluate`` of its checkpoint, equal to the per-epoch report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from micro_cli import assert_matches_expected_report, write_micro_config
from torch import nn

from robustft.cli import main
from robustft.data import OODDataModule
from robustft.methods import DROSSL, Classifier
from robustft.methods.dro_ssl import wasserstein_ascent
from robustft.ood.report import compare_reports

EXPECTED_REPORT = Path(__file__).resolve().parents[1] / "expected" / "dro_ssl_micro_report.json"

REPO = Path(__file__).resolve().parents[2]


def _batch(seed: int = 0, b: int = 8, bu: int = 12) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "labeled": {"image": torch.randn(b, 3, 32, 32, generator=g), "label": torch.randint(0, 10, (b,), generator=g)},
        "unlabeled": {"image": torch.randn(bu, 3, 32, 32, generator=g), "true_label": torch.randint(0, 10, (bu,), generator=g)},
    }


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("perturb", "frozen"), [("features", True), ("features", False), ("pixels", False)])
def test_no_steps_and_no_unlabelled_weight_is_exactly_erm(perturb: str, frozen: bool) -> None:
    torch.manual_seed(0)
    dro = DROSSL(steps=0, unlabeled_weight=0.0, warmup_epochs=0, perturb=perturb, freeze_backbone=frozen, num_classes=10)
    erm = Classifier(num_classes=10, freeze_backbone=frozen)
    erm.load_state_dict(dro.state_dict())
    dro.train(), erm.train()
    batch = _batch()
    losses = dro.training_losses(batch)  # the unlabelled stream rides along, lambda = 0 switches it off
    assert set(losses) == {"dro_labeled"}
    ref = erm.training_losses(batch["labeled"])["ce"]
    assert torch.equal(losses["dro_labeled"], ref)
    dro.total_loss(losses).backward()
    ref.backward()
    g_dro, g_erm = _grads(dro), _grads(erm)
    assert g_dro.keys() == g_erm.keys() and g_dro
    assert all(torch.equal(g_dro[k], g_erm[k]) for k in g_dro)
    # BatchNorm statistics moved identically (one training forward each)
    assert all(torch.equal(a, b) for a, b in zip(dro.buffers(), erm.buffers(), strict=True))


def test_ascent_never_lowers_the_surrogate_and_shrinks_with_gamma() -> None:
    torch.manual_seed(0)
    model = DROSSL(num_classes=10, backbone_weights=str(REPO / "data/weights/resnet20-12fca82f.th")).eval()
    with torch.no_grad():
        x = model.backbone(torch.randn(16, 3, 32, 32))
    y = torch.randint(0, 10, (16,))
    clean = F.cross_entropy(model.head(x), y, reduction="none")
    sizes = []
    for gamma in (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0, 1e4):
        z = wasserstein_ascent(model.head, x, y, gamma, steps=10, step_size=1e-2)
        surrogate = F.cross_entropy(model.head(z), y, reduction="none") - gamma * (z - x).pow(2).sum(1)
        assert bool((surrogate >= clean - 1e-6).all()), f"ascent lowered the surrogate at gamma={gamma}"
        assert bool((surrogate > clean).any())
        sizes.append((z - x).norm(dim=1))
    for small, large in zip(sizes, sizes[1:], strict=False):  # per sample, monotone in gamma
        assert bool((large <= small + 1e-6).all())
    assert bool((sizes[-1] < 1e-2 * sizes[0]).all())  # gamma = 1e4: z stays at x
    assert torch.equal(wasserstein_ascent(model.head, x, y, 1.0, steps=10, step_size=0.0), x)  # a = 0: z = x
    # a large step with a large gamma does not oscillate away (step capped at 1 / (2 gamma))
    z = wasserstein_ascent(model.head, x, y, 100.0, steps=10, step_size=1.0)
    assert float((z - x).norm(dim=1).max()) < 0.05
    u = x.clone()  # the uncapped schedule a / (t + 1) multiplies the displacement by |1 - 200 / (t + 1)|
    for t in range(10):
        u = u.requires_grad_(True)
        obj = (F.cross_entropy(model.head(u), y, reduction="none") - 100.0 * (u - x).pow(2).sum(1)).sum()
        u = (u + 1.0 / (t + 1) * torch.autograd.grad(obj, u)[0]).detach()
    assert float((u - x).norm(dim=1).min()) > 1e3


def _reference_unlabelled_term(model: DROSSL, images: torch.Tensor, mode: str) -> torch.Tensor:
    """Independent computation: pseudo-labels precomputed under no_grad, our own ascent loop."""
    hp = model.hparams
    with torch.no_grad():
        x = model.backbone(images)
        labeller = model.teacher["head"] if mode == "labeled_model" else model.head
        logits = labeller(x)
        target = logits.softmax(-1) if mode == "soft" else logits.argmax(-1)
    z = x.clone()
    for t in range(hp.steps):
        z = z.detach().requires_grad_(True)
        obj = (F.cross_entropy(model.head(z), target, reduction="none") - hp.gamma_unlabeled * (z - x).pow(2).sum(1)).sum()
        z = z + min(hp.ascent_lr / (t + 1), 1 / (2 * hp.gamma_unlabeled)) * torch.autograd.grad(obj, z)[0]
    z = z.detach()
    value = F.cross_entropy(model.head(z), target, reduction="none") - hp.gamma_unlabeled * (z - x).pow(2).sum(1)
    return hp.unlabeled_weight * value.mean()


@pytest.mark.parametrize("mode", ["hard", "soft", "labeled_model"])
def test_unlabelled_gradient_equals_precomputed_pseudo_labels(mode: str) -> None:
    torch.manual_seed(0)
    model = DROSSL(num_classes=10, steps=5, ascent_lr=0.5, gamma_unlabeled=0.3, unlabeled_weight=0.7,
                   pseudo_labels=mode, warmup_epochs=1 if mode == "labeled_model" else 0)
    if mode == "labeled_model":
        model.snapshot_teacher()
        with torch.no_grad():  # the labeller is a frozen copy: later changes of the head do not reach it
            model.head.weight.add_(0.1 * torch.randn_like(model.head.weight))
    model.train()
    batch = _batch(1)
    term = _with_epoch(model, 1 if mode == "labeled_model" else 0, batch)
    term["dro_unlabeled"].backward()
    got = _grads(model.head)
    model.zero_grad()
    _reference_unlabelled_term(model, batch["unlabeled"]["image"], mode).backward()
    want = _grads(model.head)
    assert got.keys() == want.keys() == {"weight", "bias"}
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
    assert float(got["weight"].abs().sum()) > 0
    assert all(p.grad is None for p in model.backbone.parameters())  # frozen backbone: nothing reaches it


def _with_epoch(model: DROSSL, epoch: int, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``training_losses`` as in epoch ``epoch`` (outside a trainer ``current_epoch`` is 0)."""
    cls = type(model)
    original = cls.current_epoch
    try:
        cls.current_epoch = property(lambda self: epoch)  # type: ignore[assignment]
        return model.training_losses(batch)
    finally:
        cls.current_epoch = original  # type: ignore[assignment]


def test_warmup_switches_the_unlabelled_term_on_and_labeled_model_needs_a_snapshot() -> None:
    model = DROSSL(num_classes=10, warmup_epochs=2, pseudo_labels="labeled_model").train()
    assert set(_with_epoch(model, 1, _batch())) == {"dro_labeled"}
    with pytest.raises(RuntimeError, match="warm-up"):
        _with_epoch(model, 2, _batch())
    model.snapshot_teacher()
    assert set(_with_epoch(model, 2, _batch())) == {"dro_labeled", "dro_unlabeled"}
    assert "teacher.head.weight" in model.state_dict() and "teacher_ready" in model.state_dict()


def test_inner_loop_in_eval_mode_and_modes_restored() -> None:
    torch.manual_seed(0)
    model = DROSSL(num_classes=10, perturb="pixels", freeze_backbone=False, warmup_epochs=0, steps=3)
    model.head = nn.Sequential(nn.Dropout(0.5), model.head)
    seen: list[bool] = []
    model.head[0].register_forward_hook(lambda m, i, o: seen.append(m.training))
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    tracked = int(bns[0].num_batches_tracked)
    before = {name: m.training for name, m in model.named_modules()}
    model.training_losses(_batch())
    # forwards: labelled ascent (3, eval), labelled outer (train), pseudo-labels (eval),
    # unlabelled ascent (3, eval), unlabelled outer (train)
    assert seen == [False] * 3 + [True] + [False] + [False] * 3 + [True]
    assert int(bns[0].num_batches_tracked) == tracked + 2  # only the two outer forwards update BatchNorm
    assert {name: m.training for name, m in model.named_modules()} == before

    frozen = DROSSL(num_classes=10, warmup_epochs=0, steps=2).train()  # mixed modes: a frozen backbone stays eval
    before = {name: m.training for name, m in frozen.named_modules()}
    assert not before["backbone"] and before["head"]
    frozen.training_losses(_batch())
    assert {name: m.training for name, m in frozen.named_modules()} == before


class IndexSpy(DROSSL):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unlabeled_seen: list[list[int]] = []

    def training_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.unlabeled_seen.append(batch["unlabeled"]["index"].tolist())
        return super().training_losses(batch)


def test_unlabelled_stream_is_cycled_not_truncated() -> None:
    """64 labelled (4 batches of 16 per epoch), 50 unlabelled in batches of 10 over 3 epochs: 12 batches =
    2.4 unlabelled passes, each pass a permutation of all 50 samples, continuing across labelled epochs
    (the official code's unshuffled zip reads the first half of the unlabelled set every epoch)."""
    torch.manual_seed(0)
    data = OODDataModule(
        train={"source": "npz", "path": str(REPO / "data/cifar10/cifar10_train_5k_jpeg.npz"), "max_samples": 64},
        test={"source": "npz", "path": str(REPO / "data/cifar10/cifar10_test_2k.npz"), "max_samples": 20},
        unlabeled={"tin": {"source": "npz", "path": str(REPO / "data/tinyimagenet/tin_test_32.npz"), "max_samples": 50}},
        batch_size=16, unlabeled_batch_size=10, val_fraction=0.0,
    )
    model = IndexSpy(num_classes=10, steps=1, warmup_epochs=0, scheduler=None)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    flat = [i for batch in model.unlabeled_seen for i in batch]
    assert len(model.unlabeled_seen) == 12 and len(flat) == 120
    assert sorted(flat[:50]) == list(range(50)) and sorted(flat[50:100]) == list(range(50))
    assert flat[:50] != flat[50:100]  # reshuffled per unlabelled epoch
    assert {"train/dro_labeled", "train/dro_unlabeled", "train/perturb_labeled", "train/perturb_unlabeled",
            "train/pseudo_acc"} <= set(trainer.callback_metrics)


MICRO_CONFIG = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 1,
                "num_sanity_val_steps": 0, "deterministic": True, "enable_progress_bar": False,
                "enable_model_summary": False},
    "model": {"class_path": "robustft.methods.DROSSL",
              "init_args": {"num_classes": 10, "backbone_weights": "data/weights/resnet20-12fca82f.th",
                            "steps": 3, "warmup_epochs": 1, "pseudo_labels": "labeled_model",
                            "scores": ["msp", "energy", "knn"],
                            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 1.0e-3}}}},
    "data": {"class_path": "robustft.data.OODDataModule",
             "init_args": {"train": {"source": "npz", "path": "data/cifar10/cifar10_train_5k_jpeg.npz"},
                           "shots_per_class": 10, "shots_seed": 0,
                           "test": {"source": "npz", "path": "data/cifar10/cifar10_test_2k.npz", "max_samples": 200},
                           "ood": {"far": {"dtd": {"source": "npz", "path": "data/dtd/dtd_10class_32.npz", "max_samples": 100}}},
                           "unlabeled": {"tin": {"source": "npz", "path": "data/tinyimagenet/tin_test_32.npz",
                                                 "max_samples": 200}},
                           "batch_size": 32, "eval_batch_size": 200}},
}


def test_micro_fit_through_the_cli_then_evaluate_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    path = write_micro_config(MICRO_CONFIG, tmp_path, "dro_ssl")
    cli = main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 4
    assert bool(cli.model.teacher_ready)  # the labelled-only warm-up ended and the labeller was frozen
    assert {"train/dro_labeled", "train/dro_unlabeled", "train/perturb_unlabeled"} <= set(cli.trainer.callback_metrics)
    ckpt = tmp_path / "tb" / "checkpoints" / "last.ckpt"
    main(["evaluate", "--config", str(path), "--ckpt_path", str(ckpt), "--report_dir", str(tmp_path / "rep")])
    during_fit = json.loads((tmp_path / "fit_report" / "report.json").read_text())
    evaluated = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert compare_reports(during_fit, evaluated, atol=1e-6) == []
    assert evaluated["id"]["n"] == 200 and set(evaluated["ood"]) == {"dtd"}
    # the real ResNet-20's features with a few steps of a head fine-tuned from its own linear layer
    assert evaluated["id"]["acc"] > 0.6 and evaluated["ood"]["dtd"]["msp"]["auroc"] > 0.6
    # CI's checkpoint evaluation: the same micro run must reproduce the stored report
    assert_matches_expected_report(evaluated, EXPECTED_REPORT)
