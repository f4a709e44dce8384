"""The evaluation contract every method fulfils, and the Lightning plumbing they share.

Evaluation (the ``OODEvaluation`` callback and ``python -m robustft evaluate``) never special-cases a
method. It only calls:

- :meth:`OODMethod.forward_eval` -- ONE forward pass over a batch returning every tensor the scores
  need (``logits``, ``features``, ...);
- :meth:`OODMethod.fit_reference` -- once per evaluation, for scores that need ID training statistics;
- :meth:`OODMethod.ood_scores` -- ``{score name: [B] tensor}``, higher = more in-distribution.

Subclasses implement ``forward_eval`` and ``training_loss`` and name their ``default_score``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from robustft.backbones.base import PreprocessConfig
from robustft.checkpointing import CHECKPOINT_KEY
from robustft.optim import build_optimizer, build_scheduler


class ConfigMismatchError(ValueError):
    """Model and data (or checkpoint) disagree; the message names both sides and the fix."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/Inf; the message names the step and what to change."""


def method_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def method_mismatch_message(checkpoint_method: str, configured_method: str) -> str:
    """Why a checkpoint of one method cannot be loaded into another, and the two ways out."""
    return (
        f"the checkpoint is from method {checkpoint_method} but the model is {configured_method}; "
        f"set model.class_path: {checkpoint_method} (or drop the model section to take it from the checkpoint)"
    )


class OODMethod(pl.LightningModule):
    """Base LightningModule of every robustft method.

    Args:
        num_classes: number of ID classes; must match the datamodule's training set.
        scores: post-hoc OOD scores to evaluate (registry names); defaults to the method's own list.
        score_kwargs: hyper-parameters per score, e.g. ``{"knn": {"k": 50}}``.
        optimizer, lr, weight_decay, momentum: see :func:`robustft.optim.build_optimizer`.
        scheduler: ``cosine`` (per-step, to 0) or ``none``; ``warmup_steps`` of linear warm-up.
    """

    #: score the method's paper reports; evaluation reports every configured score
    default_score: ClassVar[str] = "msp"
    #: scores evaluated when the config does not list any
    default_scores: ClassVar[tuple[str, ...]] = ("msp", "maxlogit", "energy")

    def __init__(
        self,
        num_classes: int,
        scores: list[str] | None = None,
        score_kwargs: dict[str, dict[str, Any]] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.01,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        scheduler: str = "cosine",
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigMismatchError(f"model.num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.score_names = list(scores) if scores else list(self.default_scores)
        self.score_kwargs = dict(score_kwargs or {})
        unknown = set(self.score_kwargs) - set(self.score_names)
        if unknown:
            raise ConfigMismatchError(
                f"model.score_kwargs names {sorted(unknown)}, which are not in model.scores {self.score_names}"
            )
        self._scores: dict | None = None
        #: ``{"epoch", "global_step"}`` of the checkpoint these weights were loaded from (None: not loaded)
        self.loaded_checkpoint: dict[str, int | None] | None = None
        self._validate_score_names()

    # ------------------------------------------------------------------ contract for subclasses
    @property
    def preprocess(self) -> PreprocessConfig:
        """How the datamodule must prepare images for this model (size, mean, std)."""
        raise NotImplementedError

    def forward_eval(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One forward pass; returns at least ``logits`` [B, K] (for ID accuracy)."""
        raise NotImplementedError

    def training_loss(self, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def output_keys(self) -> set[str]:
        """Keys :meth:`forward_eval` returns; scores needing other keys are refused up front."""
        return {"logits"}

    def classifier_head(self) -> tuple[Tensor, Tensor] | None:
        """The final linear layer ``(W [K, D], b [K])`` for ViM/ReAct/ASH, if the method has one."""
        return None

    # ------------------------------------------------------------------ OOD scores
    def _validate_score_names(self) -> None:
        from robustft.ood.scores import SCORES

        for name in self.score_names:
            try:
                SCORES.get(name)
            except KeyError as exc:
                raise ConfigMismatchError(f"model.scores: {exc.args[0]}") from None

    def build_scores(self) -> dict:
        """Instantiate the configured scores and check the method can feed them (fails fast)."""
        from robustft.ood.scores import build_score, check_score_requirements

        scores = {}
        for name in self.score_names:
            score = build_score(name, **self.score_kwargs.get(name, {}))
            check_score_requirements(score, self.output_keys(), self.classifier_head() is not None)
            scores[name] = score
        return scores

    @property
    def scores(self) -> dict:
        if self._scores is None:
            self._scores = self.build_scores()
        return self._scores

    def needs_reference(self) -> bool:
        return any(score.needs_fit for score in self.scores.values())

    def fit_reference(self, reference_outputs: dict[str, Tensor] | None) -> None:
        """Prepare the scores for one evaluation: fit those that need ID training statistics (KNN bank,
        class means, ...) on ``reference_outputs`` and hand the current classifier head to those that
        recompute logits (ViM, ReAct, ASH). Called before every evaluation, since weights change."""
        head = self.classifier_head()
        head = None if head is None else (head[0].detach().float(), head[1].detach().float())
        for score in self.scores.values():
            if score.needs_fit or score.needs_head:
                score.fit(reference_outputs or {}, head)

    def ood_scores(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{score name: [N] scores}``, higher = more in-distribution."""
        return {name: score(outputs) for name, score in self.scores.items()}

    # ------------------------------------------------------------------ Lightning plumbing
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ConfigMismatchError(
                f"model.num_classes is {self.num_classes} but the training data (data.train) has {data_classes} "
                f"classes; set model.init_args.num_classes: {data_classes}"
            )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.training_loss(batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}); "
                "lower model.lr, check the input normalisation, or enable gradient clipping "
                "(trainer.gradient_clip_val)"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> None:
        logits = self.forward_eval(batch)["logits"]
        labels = batch["label"]
        n = len(labels)
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), sync_dist=True, batch_size=n)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        self.log(f"{stage}/acc", acc, prog_bar=True, sync_dist=True, batch_size=n)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        outputs = self.forward_eval(batch)
        return {"index": batch["index"], "prediction": outputs["logits"].argmax(1), **self.ood_scores(outputs)}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = build_optimizer(
            self.trainable_parameters(), hp.optimizer, hp.lr, hp.weight_decay, hp.momentum
        )
        scheduler = build_scheduler(
            optimizer, hp.scheduler, int(self.trainer.estimated_stepping_batches), hp.warmup_steps
        )
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"method": method_path(type(self)), "num_classes": self.num_classes}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another method before its weights produce a wall of key errors."""
        info = checkpoint.get(CHECKPOINT_KEY)
        if info is None:
            raise ConfigMismatchError(
                "the checkpoint was not written by robustft (no 'robustft' entry); to use plain weights, set "
                "model.init_args.backbone_weights instead of --ckpt_path"
            )
        if info["method"] != method_path(type(self)):
            raise ConfigMismatchError(method_mismatch_message(info["method"], method_path(type(self))))
        if info.get("num_classes") not in (None, self.num_classes):
            raise ConfigMismatchError(
                f"the checkpoint has {info['num_classes']} classes but model.num_classes is {self.num_classes}"
            )
        self.loaded_checkpoint = {"epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step")}
