"""PALM: the spec's CPU-checkable properties (section 4(g)), the module on real data, and the real CLI.

- Sinkhorn: rows sum to 1, identical features spread evenly, permuting samples permutes rows, and it
  equals an independent float64 loop;
- masks: no weight on another class's prototype, at most top-k non-zeros per row;
- EMA: alpha = 1 keeps the prototypes, alpha = 0 gives the normalised weighted mean, unit norm,
  unassigned prototypes bit-for-bit unchanged;
- the MLE loss equals a naive soft-target cross-entropy and drops when z moves toward its prototype;
- the prototype-contrastive loss equals the official formula written as loops;
- a whole step (update + both losses) equals an independent re-implementation of the official order;
- the gradient path of L_proto: zero at alpha = 1, non-zero below, reaching the encoder;
- the unlabelled variant assigns across classes and only repels prototypes;
- the single-Gaussian Mahalanobis score equals an independent numpy computation and ranks shifted
  samples lower; the linear probe is deterministic and classifies separable data;
- resume restores the prototypes exactly; a micro fit through the CLI, then evaluate of its checkpoint,
  compared with the stored expected report.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from micro_cli import assert_matches_expected_report, write_micro_config

from robustft.cli import main
from robustft.data import OODDataModule
from robustft.methods.base import ConfigMismatchError
from robustft.methods.palm import PALM, fit_linear_probe
from robustft.methods.palm.prototypes import (
    assignment_weights,
    class_mask,
    ema_update,
    loss_weights,
    mle_loss,
    prototype_contrastive_loss,
    prototype_labels,
    sinkhorn,
)
from robustft.ood.metrics import ood_metrics
from robustft.ood.report import compare_reports
from robustft.ood.scores import build_score

REPO = Path(__file__).resolve().parents[2]
EXPECTED_REPORT = REPO / "tests" / "expected" / "palm_micro_report.json"
K, M, D = 3, 4, 8


def _unit(n: int, d: int = D, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def _model(**kwargs) -> PALM:
    torch.manual_seed(0)
    model = PALM(num_classes=10, **kwargs)
    model.log = lambda *args, **kw: None  # no Trainer attached
    return model.train()


# ------------------------------------------------------------------------------------ Sinkhorn
def _sinkhorn_loop(z: torch.Tensor, protos: torch.Tensor, eps: float, iters: int) -> np.ndarray:
    q = np.exp(z.double().numpy() @ protos.double().numpy().T / eps)  # [N, P]
    n, p = q.shape
    q = q / q.sum()
    for _ in range(iters):
        for j in range(p):  # each prototype's mass -> 1/P
            q[:, j] = q[:, j] / q[:, j].sum() / p
        for i in range(n):  # each sample's mass -> 1/N
            q[i, :] = q[i, :] / q[i, :].sum() / n
    return q * n


def test_sinkhorn_rows_sum_to_one_and_equal_an_independent_loop() -> None:
    z, protos = _unit(10), _unit(K * M, seed=1)
    q = sinkhorn(z, protos, 0.05, 3)
    assert torch.allclose(q.sum(1), torch.ones(10), atol=1e-5)
    np.testing.assert_allclose(q.double().numpy(), _sinkhorn_loop(z, protos, 0.05, 3), rtol=1e-4, atol=1e-7)
    same = sinkhorn(_unit(1).repeat(6, 1), protos, 0.05, 3)  # identical samples: spread evenly
    torch.testing.assert_close(same.sum(0) / 6, torch.full((K * M,), 1.0 / (K * M)), atol=1e-4, rtol=0)


def test_sinkhorn_is_permutation_equivariant() -> None:
    z, protos = _unit(12), _unit(K * M, seed=1)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sinkhorn(z[perm], protos), sinkhorn(z, protos)[perm], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------ masks
def test_weights_stay_on_own_class_and_at_most_top_k() -> None:
    z, protos = _unit(9), _unit(K * M, seed=1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    proto_labels = prototype_labels(K, M)
    assert proto_labels.tolist() == [0, 1, 2] * M  # interleaved: prototype p is class p mod K
    mask = class_mask(labels, proto_labels)
    q = sinkhorn(z, protos)
    for top_k in (1, 2, 3):
        w = assignment_weights(q, mask, top_k)
        wl = loss_weights(sinkhorn(z, protos), mask, w, top_k)
        for weights in (w, wl):
            assert bool((weights[mask == 0] == 0).all())
            assert bool(((weights > 0).sum(1) <= top_k).all()) and bool(((weights > 0).sum(1) >= 1).all())
        torch.testing.assert_close(wl.sum(1), torch.ones(9))
        # the kept entries of a row are its top_k own-class Sinkhorn weights
        for i in range(9):
            own = (q[i] * mask[i]).topk(top_k).indices
            assert set((w[i] > 0).nonzero().flatten().tolist()) == set(own.tolist())


# ------------------------------------------------------------------------------------ EMA
def test_ema_limits_unit_norm_and_unassigned_prototypes_unchanged() -> None:
    protos = _unit(K * M, seed=1)
    z = _unit(6)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])  # class 2's prototypes get nothing
    w = assignment_weights(sinkhorn(z, protos), class_mask(labels, prototype_labels(K, M)), 2)
    torch.testing.assert_close(ema_update(protos, z, w, 1.0), protos, atol=3e-7, rtol=0)  # up to normalize()'s rounding
    zero = ema_update(protos, z, w, 0.0)
    for p in range(K * M):
        if w[:, p].sum() > 0:
            mean = sum(w[i, p] * z[i] for i in range(6))
            torch.testing.assert_close(zero[p], mean / mean.norm())
    half = ema_update(protos, z, w, 0.5)
    torch.testing.assert_close(half.norm(dim=1), torch.ones(K * M))
    unassigned = prototype_labels(K, M) == 2
    assert bool((w[:, unassigned] == 0).all())
    assert torch.equal(half[unassigned], protos[unassigned])
    assert not torch.allclose(half[~unassigned], protos[~unassigned])


# ------------------------------------------------------------------------------------ losses
def test_mle_equals_naive_soft_target_cross_entropy_and_drops_toward_the_prototype() -> None:
    z, protos = _unit(5), _unit(K * M, seed=1)
    w = F.normalize(torch.rand(5, K * M, generator=torch.Generator().manual_seed(4)), p=1, dim=1)
    naive = []
    for i in range(5):
        logits = [float(z[i] @ protos[p]) / 0.1 for p in range(K * M)]
        log_norm = np.log(sum(np.exp(v) for v in logits))
        naive.append(-sum(float(w[i, p]) * (logits[p] - log_norm) for p in range(K * M)))
    np.testing.assert_allclose(mle_loss(z, protos, w, 0.1).numpy(), naive, rtol=1e-5)
    one_hot = F.one_hot(torch.tensor([2]), K * M).float()
    closer = F.normalize(z[:1] + 0.5 * protos[2:3], dim=1)
    assert mle_loss(closer, protos, one_hot) < mle_loss(z[:1], protos, one_hot)


def _proto_contrast_loop(protos: torch.Tensor, labels: list[int], tau: float = 0.5) -> float:
    """The official proto_contra: logits shifted by their row max, positives averaged, self excluded."""
    p = protos.double()
    total = 0.0
    for a in range(len(p)):
        logits = [float(p[a] @ p[b]) / tau for b in range(len(p))]
        top = max(logits)
        pos = [logits[b] - top for b in range(len(p)) if b != a and labels[b] == labels[a]]
        neg = np.log(sum(np.exp(logits[b] - top) for b in range(len(p)) if b != a))
        total += (sum(pos) / len(pos) if pos else 0.0) - neg
    return -total / len(p)


def test_prototype_contrastive_loss_equals_the_official_formula() -> None:
    protos = _unit(K * M, seed=2)
    labels = prototype_labels(K, M)
    expected = _proto_contrast_loop(protos, labels.tolist())
    assert abs(float(prototype_contrastive_loss(protos, labels)) - expected) < 1e-5
    # unlabelled variant: no positives, only repulsion (mean log-sum-exp over the others)
    unlab = float(prototype_contrastive_loss(protos, None))
    logits = protos @ protos.T / 0.5
    expected_unlab = torch.logsumexp(logits.masked_fill(torch.eye(K * M, dtype=torch.bool), float("-inf")), 1).mean()
    assert abs(unlab - float(expected_unlab)) < 1e-5


def _official_step(z: torch.Tensor, labels: torch.Tensor, protos: torch.Tensor, alpha: float, k: int, classes: int):
    """The official ``mle_loss`` + ``proto_contra`` order, re-written independently (column/row
    normalisations spelled out with sums): returns (loss_mle, new prototypes)."""
    n_protos = len(protos)
    mask = (labels[:, None] == (torch.arange(n_protos) % classes)[None]).float()

    def sink(mu):
        q = torch.exp(z.detach() @ mu.detach().T / 0.05).T  # [P, N]
        q = q / q.sum()
        for _ in range(3):
            q = q / q.sum(1, keepdim=True) / q.shape[0]
            q = q / q.sum(0, keepdim=True) / q.shape[1]
        return (q * q.shape[1]).T

    def top(m):
        out = torch.zeros_like(m)
        out.scatter_(1, m.topk(k, dim=1).indices, 1.0)
        return out

    q = sink(protos)
    um = top(mask * q) * mask * q
    um = um / um.sum(1, keepdim=True)
    col = um.sum(0, keepdim=True)
    um = torch.where(col > 0, um / col.clamp_min(1e-30), torch.zeros_like(um))
    new = F.normalize(alpha * protos + (1 - alpha) * um.T @ z, dim=1)
    q2 = sink(new)
    lm = top(um) * mask * q2
    lm = lm / lm.sum(1, keepdim=True)
    logits = z @ new.detach().T / 0.1
    mle = -((lm * logits).sum(1) - torch.log(torch.exp(logits).sum(1))).mean()
    return mle, new


def test_a_whole_step_equals_the_official_order_reimplemented() -> None:
    model = _model(prototypes_per_class=M, top_k=2, momentum=0.9)
    model.prototypes.copy_(_unit(10 * M, 128, seed=5))
    z_local = F.normalize(torch.randn(6, 2, 128, generator=torch.Generator().manual_seed(6)), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 3, 9])
    before = model.prototypes.clone()
    losses = model.prototype_losses(z_local, labels)
    z = torch.cat(torch.unbind(z_local, dim=1))  # official: views stacked view-major
    mle, new = _official_step(z, labels.repeat(2), before, 0.9, 2, classes=10)
    torch.testing.assert_close(model.prototypes, new, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(losses["mle"], mle, atol=1e-5, rtol=1e-5)
    expected_proto = _proto_contrast_loop(new, (torch.arange(10 * M) % 10).tolist())
    assert abs(float(losses["proto"]) - expected_proto) < 1e-4


def test_proto_loss_gradient_path_zero_at_alpha_one_and_nonzero_below() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1])
    protos = _unit(K * M, seed=1)
    for alpha, nonzero in ((1.0, False), (0.999, True), (0.5, True)):
        z = _unit(5).requires_grad_(True)
        w = assignment_weights(sinkhorn(z, protos), class_mask(labels, prototype_labels(K, M)), 2)
        loss = prototype_contrastive_loss(ema_update(protos, z, w, alpha), prototype_labels(K, M))
        (grad,) = torch.autograd.grad(loss, z)
        assert bool(grad.abs().sum() > 0) == nonzero, alpha
    # through the module: the proto term alone reaches the backbone only when alpha < 1
    images = torch.randn(4, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = {"image": images, "label": torch.tensor([0, 1, 2, 3])}
    for alpha, nonzero in ((1.0, False), (0.9, True)):
        model = _model(momentum=alpha)
        model.training_losses(batch)["proto"].backward()
        grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
        assert (sum(float(g.abs().sum()) for g in grads) > 0) == nonzero, alpha


def test_unlabelled_variant_assigns_across_classes_and_prototypes_move() -> None:
    model = _model(supervision="unlabelled", prototypes_per_class=2, top_k=2)
    z = F.normalize(torch.randn(8, 2, 128, generator=torch.Generator().manual_seed(1)), dim=-1)
    labels = torch.zeros(8, dtype=torch.long)  # all "class 0": labels must be ignored
    before = model.prototypes.clone()
    model.prototype_losses(z, labels)
    moved_classes = set((model.prototype_classes[(model.prototypes != before).any(1)]).tolist())
    assert len(moved_classes) > 1  # the labelled variant would move class 0's prototypes only
    labelled = _model(prototypes_per_class=2, top_k=2)
    before = labelled.prototypes.clone()
    labelled.prototype_losses(z, labels)
    assert set((labelled.prototype_classes[(labelled.prototypes != before).any(1)]).tolist()) == {0}


# ------------------------------------------------------------------------------------ scores, probe
def test_global_mahalanobis_equals_numpy_and_ranks_shifted_samples_lower() -> None:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g)
    train = torch.randn(300, 6, generator=g) @ mix + 2.0
    test = torch.randn(50, 6, generator=g) @ mix + 2.0
    score = build_score("mahalanobis_global")
    score.fit({"features": train})
    got = score({"features": test}).double().numpy()
    x = train.double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    mean, std = x.mean(0), x.std(0)
    zt = (x - mean) / std
    precision = np.linalg.pinv(zt.T @ zt / len(zt))
    q = test.double().numpy()
    q = (q / np.linalg.norm(q, axis=1, keepdims=True) - mean) / std
    np.testing.assert_allclose(got, -np.einsum("nd,de,ne->n", q, precision, q), rtol=1e-6)
    raw = build_score("mahalanobis_global", normalize=False)
    raw.fit({"features": train})
    inside = raw({"features": test})
    shifted = raw({"features": test + torch.tensor([3.0, -3.0, 0, 0, 0, 0])})
    assert ood_metrics(inside, shifted)["auroc"] > 0.95


def test_linear_probe_is_deterministic_and_separates_classes() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g) * 3
    labels = torch.arange(3).repeat(40)
    feats = centers[labels] + torch.randn(120, 5, generator=g)
    w1, b1 = fit_linear_probe(feats, labels, 3)
    w2, b2 = fit_linear_probe(feats, labels, 3)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    assert float(((feats @ w1.T + b1).argmax(1) == labels).float().mean()) > 0.9


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ConfigMismatchError, match="model.momentum"):
        PALM(momentum=1.5)
    with pytest.raises(ConfigMismatchError, match="model.supervision"):
        PALM(supervision="semi")
    with pytest.raises(ConfigMismatchError, match="model.cifar_stem"):
        PALM(cifar_stem=True)


def test_cifar_stem_keeps_32x32_resolution_in_a_timm_resnet() -> None:
    model = PALM(backbone="timm/resnet18", cifar_stem=True)
    assert model.preprocess.image_size == 32
    assert model.backbone.forward_intermediates(torch.zeros(1, 3, 32, 32), [1])[1].shape[-1] == 32


# ------------------------------------------------------------------------------------ real data, Lightning
def _datamodule(batch_size: int = 16) -> OODDataModule:
    return OODDataModule(
        train={"source": "npz", "path": str(REPO / "data/cifar10/cifar10_train_5k_jpeg.npz"), "max_samples": 64},
        test={"source": "npz", "path": str(REPO / "data/cifar10/cifar10_test_2k.npz"), "max_samples": 32},
        val_fraction=0.0, batch_size=batch_size, n_views=2, augmentation="simclr",
    )


def test_loss_goes_down_on_real_images_and_each_class_uses_several_prototypes() -> None:
    dm = _datamodule(batch_size=32)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (2, 3, 32, 32)  # two SimCLR views per image
    model = _model(backbone_weights=str(REPO / "data/weights/resnet20-12fca82f.th"), momentum=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    totals = []
    for _ in range(8):
        losses = model.training_losses(batch)
        totals.append(float(losses["mle"]))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert totals[-1] < totals[0] - 0.1, totals
    # the balanced assignment spreads a class's samples over several of its prototypes: the strongest
    # own-class prototype (hard assignment) differs between samples of one class
    with torch.no_grad():
        z = model(batch["image"].flatten(0, 1))
        labels = batch["label"].repeat_interleave(2)
        hard = (sinkhorn(z, model.prototypes) * class_mask(labels, model.prototype_classes)).argmax(1)
    counts = torch.bincount(labels, minlength=10)
    spread = [len(hard[labels == c].unique()) for c in range(10) if counts[c] >= 6]
    assert spread and min(spread) >= 2, spread


class _Record(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: PALM) -> None:
        self.at_start = pl_module.prototypes.clone()


def test_resume_restores_the_prototypes_exactly(tmp_path: Path) -> None:
    def trainer(steps: int, callbacks=()) -> pl.Trainer:
        return pl.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=tmp_path, logger=False,
                          enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                          limit_val_batches=0, callbacks=list(callbacks), enable_checkpointing=False)

    pl.seed_everything(0)
    first = PALM(backbone_weights=str(REPO / "data/weights/resnet20-12fca82f.th"))
    start = first.prototypes.clone()
    t1 = trainer(2)
    t1.fit(first, datamodule=_datamodule())
    assert not torch.equal(first.prototypes, start)  # the EMA moved them
    ckpt = tmp_path / "p.ckpt"
    t1.save_checkpoint(ckpt)
    second = PALM(backbone_weights=str(REPO / "data/weights/resnet20-12fca82f.th"), prototype_seed=123)
    assert not torch.equal(second.prototypes, first.prototypes)
    record = _Record()
    trainer(3, [record]).fit(second, datamodule=_datamodule(), ckpt_path=ckpt)
    assert torch.equal(record.at_start, first.prototypes)


MICRO_CONFIG = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 1,
                "num_sanity_val_steps": 0, "deterministic": True, "enable_progress_bar": False,
                "enable_model_summary": False},
    "model": {"class_path": "robustft.methods.palm.PALM",
              "init_args": {"num_classes": 10, "backbone_weights": "data/weights/resnet20-12fca82f.th",
                            "momentum": 0.9, "probe_steps": 50,
                            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.9}}}},
    "data": {"class_path": "robustft.data.OODDataModule",
             "init_args": {"train": {"source": "npz", "path": "data/cifar10/cifar10_train_5k_jpeg.npz", "max_samples": 300},
                           "val_fraction": 0.1,
                           "test": {"source": "npz", "path": "data/cifar10/cifar10_test_2k.npz", "max_samples": 200},
                           "ood": {"far": {"dtd": {"source": "npz", "path": "data/dtd/dtd_10class_32.npz", "max_samples": 100}}},
                           "n_views": 2, "augmentation": "simclr", "batch_size": 32, "eval_batch_size": 200}},
}


@pytest.mark.slow
def test_micro_fit_through_the_cli_then_evaluate_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    path = write_micro_config(MICRO_CONFIG, tmp_path, "palm")
    cli = main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 4
    assert {"train/mle", "train/proto", "val/proto_acc"} <= set(cli.trainer.callback_metrics)
    ckpt = tmp_path / "tb" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(state["prototypes"], cli.model.prototypes)  # the prototypes are in the checkpoint
    assert not any(k.startswith("probe_") for k in state)  # the probe is refitted at every evaluation
    main(["evaluate", "--config", str(path), "--ckpt_path", str(ckpt), "--report_dir", str(tmp_path / "rep")])
    during_fit = json.loads((tmp_path / "fit_report" / "report.json").read_text())
    evaluated = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert compare_reports(during_fit, evaluated, atol=1e-6) == []
    assert "linear probe" in evaluated["meta"]["id_accuracy"]
    assert set(evaluated["ood"]["dtd"]) == {"mahalanobis_global", "knn", "mds"}
    # pre-trained ResNet-20 features barely moved: the probe classifies, the Gaussian score detects textures
    assert evaluated["id"]["acc"] > 0.5 and evaluated["ood"]["dtd"]["mahalanobis_global"]["auroc"] > 0.6
    assert_matches_expected_report(evaluated, EXPECTED_REPORT)
