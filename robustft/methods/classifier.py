"""Baseline: a backbone plus a linear head trained with cross-entropy (optionally label smoothing).

This is the OpenOOD "CrossEntropy" row; any post-hoc score (MSP, MaxLogit, Energy, KNN, ...) is then
evaluated on top of it.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from robustft.backbones import create_backbone
from robustft.backbones.base import PreprocessConfig
from robustft.methods.base import ConfigMismatchError, OODMethod
from robustft.optim import SGD_CIFAR, WARMUP_COSINE


class Classifier(OODMethod):
    """Backbone + linear head.

    Args:
        num_classes: number of ID classes.
        backbone: registered backbone name (``cifar_resnet20``) or ``timm/<model>``.
        backbone_weights: local weights file; a classifier head stored in it (e.g. akamaster's
            ``linear``) initialises the head when its class count matches.
        backbone_kwargs: extra constructor arguments of the backbone.
        freeze_backbone: train the head only (linear probing).
        label_smoothing: epsilon of label-smoothed cross-entropy (0 = plain cross-entropy).
        backbone_lr_mult: learning rate of the backbone relative to the head's (the optimizer's
            ``lr``); 1 trains both alike, e.g. 0.1 fine-tunes the backbone ten times slower.
        scores, score_kwargs, optimizer, scheduler: see :class:`~robustft.methods.base.OODMethod`
            (default SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine to 0 per step).

    Loss terms: ``ce``.
    """

    default_score = "msp"
    default_scores = ("msp", "maxlogit", "energy")

    def __init__(
        self,
        num_classes: int = 10,
        backbone: str = "cifar_resnet20",
        backbone_weights: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        freeze_backbone: bool = False,
        label_smoothing: float = 0.0,
        backbone_lr_mult: float = 1.0,
        scores: list[str] | None = None,
        score_kwargs: dict[str, dict[str, Any]] | None = None,
        optimizer: OptimizerCallable = SGD_CIFAR,
        scheduler: LRSchedulerCallable | None = WARMUP_COSINE,
    ) -> None:
        super().__init__(num_classes, scores, score_kwargs, optimizer, scheduler)
        self.save_hyperparameters()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")
        if not 0.0 < backbone_lr_mult < float("inf"):
            raise ConfigMismatchError(
                f"model.backbone_lr_mult must be a finite number > 0, got {backbone_lr_mult} "
                "(to train the head only, set freeze_backbone: true)"
            )
        self.backbone_lr_mult = float(backbone_lr_mult)
        self.backbone = create_backbone(backbone, weights=backbone_weights, **(backbone_kwargs or {}))
        self.head = nn.Linear(self.backbone.feature_dim, num_classes)
        self._init_head_from_weights(getattr(self.backbone, "pretrained_head", None) or {})
        if freeze_backbone:
            # eval mode now, not only in train(): Lightning >= 2.2 keeps the modes a module was built with
            # and never calls train() at fit start, so a frozen backbone's BatchNorm statistics would drift
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def _init_head_from_weights(self, head: dict[str, Tensor]) -> None:
        if not head:
            return
        if head.get("weight") is not None and head["weight"].shape == self.head.weight.shape:
            self.head.load_state_dict(head)
        else:
            shape = tuple(head["weight"].shape) if "weight" in head else None
            rank_zero_warn(
                f"model.backbone_weights holds a classifier of shape {shape}, the model needs "
                f"{tuple(self.head.weight.shape)}: the head is initialised randomly"
            )

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.backbone.preprocess

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def forward_eval(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        features = self.backbone(batch["image"])
        return {"logits": self.head(features), "features": features}

    def output_keys(self) -> set[str]:
        return {"logits", "features"}

    def classifier_head(self) -> tuple[Tensor, Tensor]:
        return self.head.weight, self.head.bias

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.hparams.freeze_backbone:  # keep BatchNorm statistics of a frozen backbone fixed
            self.backbone.eval()
        return self

    def param_groups(self) -> list[dict[str, Any]]:
        """Backbone (``lr_mult = backbone_lr_mult``) and head; a frozen backbone's group is dropped."""
        return [
            {"name": "backbone", "params": list(self.backbone.parameters()), "lr_mult": self.backbone_lr_mult},
            {"name": "head", "params": list(self.head.parameters())},
        ]

    def training_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = self(batch["image"])
        return {"ce": F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)}
