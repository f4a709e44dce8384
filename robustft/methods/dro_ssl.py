"""DRO + self-training with (possibly out-of-domain) unlabelled data: "RSS" robust self-training
(Saberi et al., ICLR 2024; spec ``../shared/specs/methods-robust-finetuning.md`` section 5).

Objective (the Lagrangian form of Wasserstein DRO, cost ``c(z, x) = ||z - x||^2``)::

    phi_gamma(x, y; theta) = sup_z  CE(f(z; theta), y) - gamma * ||z - x||^2
    loss = mean_labelled phi_gamma(x, y) + lambda * mean_unlabelled phi_gamma'(x', yhat(x'))

The sup is approximated by ``T`` steps of gradient *ascent* on the input, from ``z_0 = x``:
``z_{t+1} = z_t + a / (t + 1) * grad_z [CE(f(z_t), y) - gamma ||z_t - x||^2]`` (per-sample gradients,
so the step does not depend on the batch size). By Danskin's theorem the theta-gradient of ``phi`` is
the gradient of ``CE(f(z_T), y)`` with ``z_T`` held fixed, which is what is back-propagated; the logged
term is the surrogate value itself (the cost part is a constant for theta).

Where ``z`` lives (``perturb``):

- ``features`` (default): the feature space of the backbone, ``x = backbone(image)``; the ascent moves
  the feature vector and only the head is evaluated in the inner loop. With the default
  ``freeze_backbone: true`` the backbone is a fixed feature extractor (eval mode: BatchNorm statistics
  never change). With a trainable backbone the perturbation ``z_T - x`` is detached and added to the
  live features, so the backbone gets the Danskin gradient too.
- ``pixels``: the normalised input image; the whole network runs in the inner loop.

The inner loop runs every module in eval mode (no BatchNorm statistic update, no dropout) and restores
each module's own mode afterwards (not a blanket ``train()``: a frozen backbone stays in eval mode).
Parameter gradients are never touched by the inner loop (``torch.autograd.grad`` w.r.t. ``z`` only).

Pseudo-labels (``pseudo_labels``), always computed under ``no_grad`` in eval mode (no gradient through
the targets -- the official code's soft targets carry autograd, a quirk not copied):

- ``hard``: ``argmax f(x')`` of the current model;
- ``soft``: ``softmax f(x')`` of the current model, a soft cross-entropy target;
- ``labeled_model``: hard labels of a frozen copy of the model taken at the end of the labelled-only
  warm-up (reviewer 2's reading of the paper: "a model trained on the labelled data"); it is a
  registered module, so checkpoints hold it and a resumed run uses the same labeller.

Warm-up: during the first ``warmup_epochs`` epochs only the labelled term is optimised.

Data: the shared datamodule's ``data.unlabeled`` stream. It is cycled through its own shuffled epochs
(``robustft/data/unlabeled.py``), so every unlabelled sample is used once per unlabelled epoch -- the
official code's unshuffled ``zip`` that only ever reads the first half of the unlabelled set is not
copied. Without ``data.unlabeled`` the method is labelled-only DRO.

Differences from the official code, on purpose: logits into CE (no softmax applied twice), detached
pseudo-labels, a cycled and shuffled unlabelled stream, a backbone in eval mode for feature
extraction, hyper-parameters selected on validation (never on test), no hidden x100 loss factor.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft.methods.base import ConfigMismatchError
from robustft.methods.classifier import Classifier

PseudoLabels = Literal["hard", "soft", "labeled_model"]
Perturb = Literal["features", "pixels"]


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Every submodule of ``modules`` in eval mode inside the block; each one's own mode restored after."""
    saved = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for module, _ in saved:
            module.training = False
        yield
    finally:
        for module, mode in saved:
            module.training = mode


def per_sample_cost(z: Tensor, x: Tensor) -> Tensor:
    """``||z - x||^2`` per sample (summed over every non-batch dimension)."""
    return (z - x).flatten(1).pow(2).sum(1)


def wasserstein_ascent(
    fn: Callable[[Tensor], Tensor], x: Tensor, target: Tensor, gamma: float, steps: int, step_size: float
) -> Tensor:
    """``z_T`` of ``T`` gradient-ascent steps on ``sum_i CE(fn(z_i), target_i) - gamma ||z_i - x_i||^2``,
    from ``z_0 = x``, step ``min(step_size / (t + 1), 1 / (2 gamma))``. Returns a detached tensor;
    touches no parameter gradient. ``target``: class indices ``[B]`` or probabilities ``[B, K]``.

    The cap ``1 / (2 gamma)`` [our choice, not the official code's]: a step ``eta`` multiplies the
    cost part of the displacement by ``1 - 2 gamma eta``, so a fixed step with ``gamma * step_size > 1``
    oscillates and diverges (the larger gamma, the *larger* ``||z - x||``). At the cap the update is
    the fixed-point iteration ``z = x + grad CE(z) / (2 gamma)`` of the inner problem's stationarity
    condition; below it the official schedule ``step_size / (t + 1)`` is unchanged."""
    x = x.detach()
    target = target.detach()
    z = x.clone()
    for t in range(steps):
        z.requires_grad_(True)
        with torch.enable_grad():
            objective = (F.cross_entropy(fn(z), target, reduction="none") - gamma * per_sample_cost(z, x)).sum()
            (grad,) = torch.autograd.grad(objective, z)
        eta = step_size / (t + 1)
        if gamma > 0:
            eta = min(eta, 1.0 / (2.0 * gamma))
        z = (z + eta * grad).detach()
    return z


class DROSSL(Classifier):
    """Wasserstein-DRO on labelled data plus DRO self-training on (shifted) unlabelled data (RSS).

    Args:
        steps: ``T``, gradient-ascent steps of the inner maximisation (0: no perturbation, ERM).
        ascent_lr: ``a``, the ascent step (step ``t`` uses ``a / (t + 1)``); the official code calls it
            ``alpha`` -- not the paper's Wasserstein shift radius.
        gamma: ``gamma``, cost penalty of the labelled surrogate (larger: smaller perturbations).
        gamma_unlabeled: ``gamma'``, cost penalty of the unlabelled surrogate.
        unlabeled_weight: ``lambda``, weight of the unlabelled term (0: labelled-only DRO).
        pseudo_labels: ``hard`` | ``soft`` | ``labeled_model`` (module docstring).
        warmup_epochs: epochs trained on the labelled term only; with ``labeled_model`` the labeller is
            the model at the end of these epochs (must then be >= 1).
        perturb: ``features`` (default: the backbone's feature vector) or ``pixels`` (the input image).
        freeze_backbone: train the head only (default ``true``: the paper's frozen feature extractor).
        **kwargs: everything :class:`~robustft.methods.Classifier` takes (backbone, optimizer, ...).

    Loss terms: ``dro_labeled`` (mean labelled surrogate), ``dro_unlabeled`` (``lambda`` times the mean
    unlabelled surrogate; only with an unlabelled stream and after the warm-up). Also logged (not
    optimised): ``train/perturb_labeled`` / ``train/perturb_unlabeled`` (mean ``||z_T - x||``) and
    ``train/pseudo_acc`` (pseudo-label accuracy against the stream's ``true_label``, a diagnostic; -1
    labels are ignored).
    """

    def __init__(
        self,
        steps: int = 10,
        ascent_lr: float = 0.1,
        gamma: float = 1.0,
        gamma_unlabeled: float = 0.5,
        unlabeled_weight: float = 1.0,
        pseudo_labels: PseudoLabels = "hard",
        warmup_epochs: int = 1,
        perturb: Perturb = "features",
        freeze_backbone: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(freeze_backbone=freeze_backbone, **kwargs)
        self.save_hyperparameters()
        if steps < 0 or warmup_epochs < 0:
            raise ConfigMismatchError(f"model.steps and model.warmup_epochs must be >= 0, got {steps}, {warmup_epochs}")
        if ascent_lr < 0 or gamma < 0 or gamma_unlabeled < 0 or unlabeled_weight < 0:
            raise ConfigMismatchError(
                "model.ascent_lr, gamma, gamma_unlabeled and unlabeled_weight must be >= 0, got "
                f"{ascent_lr}, {gamma}, {gamma_unlabeled}, {unlabeled_weight}"
            )
        if pseudo_labels not in ("hard", "soft", "labeled_model"):
            raise ConfigMismatchError(f"model.pseudo_labels: hard | soft | labeled_model, got {pseudo_labels!r}")
        if perturb not in ("features", "pixels"):
            raise ConfigMismatchError(f"model.perturb: features | pixels, got {perturb!r}")
        if pseudo_labels == "labeled_model" and warmup_epochs < 1:
            raise ConfigMismatchError(
                "model.pseudo_labels: labeled_model labels with the model at the end of the labelled-only "
                "warm-up; set model.warmup_epochs >= 1"
            )
        self.teacher: nn.Module | None = None
        if pseudo_labels == "labeled_model":  # filled in by snapshot_teacher(); registered, so checkpointed
            self.teacher = nn.ModuleDict({"head": copy.deepcopy(self.head)})
            if not freeze_backbone:
                self.teacher["backbone"] = copy.deepcopy(self.backbone)
            self.teacher.requires_grad_(False)
            self.register_buffer("teacher_ready", torch.zeros((), dtype=torch.bool))

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> DROSSL:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def on_train_epoch_start(self) -> None:
        if self.teacher is not None and self.current_epoch >= self.hparams.warmup_epochs and not bool(self.teacher_ready):
            self.snapshot_teacher()

    def snapshot_teacher(self) -> None:
        """Freeze a copy of the current model as the ``labeled_model`` pseudo-labeller."""
        if self.teacher is None:
            raise RuntimeError("snapshot_teacher() needs pseudo_labels: labeled_model")
        self.teacher["head"].load_state_dict(self.head.state_dict())
        if "backbone" in self.teacher:
            self.teacher["backbone"].load_state_dict(self.backbone.state_dict())
        self.teacher_ready.fill_(True)

    # ------------------------------------------------------------------ pieces
    def _inputs(self, images: Tensor) -> Tensor:
        """``x`` of the surrogate: backbone features (``features``) or the image itself (``pixels``)."""
        if self.hparams.perturb == "pixels":
            return images
        if self.hparams.freeze_backbone:
            with torch.no_grad():
                return self.backbone(images)
        return self.backbone(images)

    def _outer(self, z: Tensor) -> Tensor:
        """Logits of a (perturbed) input ``z`` of the space given by ``perturb``."""
        return self.head(z) if self.hparams.perturb == "features" else self(z)

    @torch.no_grad()
    def pseudo_label(self, images: Tensor, x: Tensor) -> Tensor:
        """Detached pseudo-labels of unlabelled ``images`` (``x``: their surrogate inputs), in eval mode."""
        mode = self.hparams.pseudo_labels
        with eval_mode(self):
            if mode == "labeled_model":
                if not bool(self.teacher_ready):
                    raise RuntimeError("pseudo_labels: labeled_model used before the warm-up ended (snapshot_teacher())")
                assert self.teacher is not None
                if "backbone" in self.teacher:
                    logits = self.teacher["head"](self.teacher["backbone"](images))
                elif self.hparams.perturb == "features":
                    logits = self.teacher["head"](x)
                else:
                    logits = self.teacher["head"](self.backbone(images))
                return logits.argmax(-1)
            logits = self._outer(x)
        return logits.softmax(-1) if mode == "soft" else logits.argmax(-1)

    def surrogate(self, x: Tensor, target: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
        """``(mean surrogate, mean ||z_T - x||)`` on inputs ``x`` with (detached) targets ``target``.

        Differentiable w.r.t. the parameters through ``CE(f(z_T), target)`` (Danskin); ``z_T`` comes from
        the ascent in eval mode. With a trainable backbone in feature space, ``z_T = x + (z_T - x).detach()``
        keeps the path to the backbone."""
        with eval_mode(self):
            z = wasserstein_ascent(self._outer, x, target, gamma, self.hparams.steps, self.hparams.ascent_lr)
        delta = z - x.detach()
        z = x + delta  # the live x: gradients reach a trainable backbone (pixels / frozen: x has none)
        cost = per_sample_cost(delta, torch.zeros_like(delta))
        # mean(CE) - gamma mean(cost): with T = 0 the cost is 0 and this is bit for bit the ERM loss
        value = F.cross_entropy(self._outer(z), target.detach()) - gamma * cost.mean()
        return value, cost.sqrt().mean()

    def unlabeled_active(self) -> bool:
        return self.hparams.unlabeled_weight > 0 and self.current_epoch >= self.hparams.warmup_epochs

    # ------------------------------------------------------------------ training
    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        labeled, unlabeled = (batch["labeled"], batch["unlabeled"]) if "labeled" in batch else (batch, None)
        images = labeled["image"]
        if images.ndim == 5:  # n_views: the first view
            images = images[:, 0]
        phi_l, size_l = self.surrogate(self._inputs(images), labeled["label"], self.hparams.gamma)
        losses = {"dro_labeled": phi_l}
        diagnostics = {"perturb_labeled": size_l}
        if unlabeled is not None and self.unlabeled_active():
            u_images = unlabeled["image"]
            if u_images.ndim == 5:
                u_images = u_images[:, 0]
            x_u = self._inputs(u_images)
            targets = self.pseudo_label(u_images, x_u.detach())
            phi_u, size_u = self.surrogate(x_u, targets, self.hparams.gamma_unlabeled)
            losses["dro_unlabeled"] = self.hparams.unlabeled_weight * phi_u
            diagnostics["perturb_unlabeled"] = size_u
            true = unlabeled.get("true_label")
            if isinstance(true, Tensor):
                hard = targets.argmax(-1) if targets.is_floating_point() else targets
                known = true >= 0
                if bool(known.any()):
                    diagnostics["pseudo_acc"] = (hard[known] == true[known]).float().mean()
        self.last_diagnostics = {k: v.detach() for k, v in diagnostics.items()}
        if self._trainer is not None:
            for name, value in self.last_diagnostics.items():
                self.log(f"train/{name}", value, batch_size=len(images))
        return losses
