"""FLYP / CMA: fine-tune both CLIP towers with an image-text contrastive loss on class-prompt captions.

CMA (Kim & Hwang, CVPR 2025, ``ma-kjh/CMA-OoDD``) is FLYP (Goyal et al., CVPR 2023) plus a regulariser
``λ·R`` that raises the log-partition of all image-text similarities of the batch, closing the modality
gap between ID images and ID label texts (``robustft.losses.contrastive_loss``; λ = 0 is exactly FLYP).
Each training image is paired with a caption of its class (``train_template``, or a random template
per sample); repeated classes in a batch give duplicate captions that count as negatives, as in FLYP.
Image tower, text tower and ``logit_scale`` are all trained (AdamW, weight decay on everything as in
the official code). The loss terms are logged apart: ``contrastive`` (the InfoNCE, FLYP's whole loss) and,
for λ > 0, ``alignment`` = λ·R; their sum is the CMA loss. Evaluation is the zero-shot path of :class:`ZeroShotCLIP` with the fine-tuned
encoders: MCM, GL-MCM, NegLabel (negatives mined once with the *initial* weights at ``fit`` start and
re-encoded with the fine-tuned text tower) and the logit scores.

The same module pre-trains the tiny CPU CLIP from random init (``lam: 0``, ``pretrained: null``; see
``configs/clip/tiny_pretrain_cifar10.yaml``) with ``ExportCLIPWeights`` writing the open_clip weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from robustft.losses import alignment_regularizer, contrastive_loss
from robustft.methods.zero_shot import ZeroShotCLIP
from robustft.optim import ADAMW_CLIP, WARMUP_COSINE

__all__ = ["ContrastiveFinetune"]

POSITIVES = ("pair", "class")


class ContrastiveFinetune(ZeroShotCLIP):
    """FLYP (``lam=0``) / CMA (``lam>0``) full fine-tuning of CLIP; evaluation as :class:`ZeroShotCLIP`.

    Args (besides those of :class:`ZeroShotCLIP`):
        lam: CMA regulariser weight λ; default 0.001 (the paper's command line). The official
            ``train.py`` argparse default is 0.0, i.e. plain FLYP.
        train_template: caption template of the training pairs (official CMA: ``"a photo of a {}"``;
            default ``"a photo of a {}."``); ``None`` draws one of ``templates`` per sample.
        max_logit_scale: clamp ``exp(logit_scale)`` to this value after every step (open_clip's
            training clamps at 100); ``None`` (default) leaves it unclamped as the official CMA code.
        positives: ``"pair"`` (default, FLYP/CMA): each image matches only its own caption and other
            images' captions of the same class are negatives; ``"class"``: every same-class pair of
            the batch is a positive (UniCL targets, :func:`robustft.losses.same_id_targets`). Use
            ``"class"`` when pre-training on few classes, where a batch repeats each class many times.
        gather_distributed: under DDP compute the loss on the all-gathered global batch (with
            gradients), matching the official single-device batch of 512.
        optimizer, scheduler: see :class:`~robustft.methods.base.OODMethod`. Official CMA uses AdamW,
            lr 1e-5, weight decay 0.1, cosine with 500 warm-up steps; our default is that AdamW
            (:data:`robustft.optim.ADAMW_CLIP`) with the cosine schedule without warm-up, so short runs
            reach the learning rate (set ``scheduler.init_args.warmup_steps: 500`` to reproduce).

    Loss terms: ``contrastive`` and, when ``lam > 0``, ``alignment`` (already weighted by λ).
    """

    default_score = "neglabel"
    trainable = True

    def __init__(
        self,
        clip_model: str,
        pretrained: str | None = None,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        templates: list[str] | None = None,
        context_length: int | None = None,
        neg_candidates: str | None = None,
        neg_templates: dict[str, list[str]] | None = None,
        neg_eta: float = 0.95,
        neg_topk: float = 0.15,
        scores: list[str] | None = None,
        score_kwargs: dict[str, dict[str, Any]] | None = None,
        lam: float = 0.001,
        train_template: str | None = "a photo of a {}.",
        max_logit_scale: float | None = None,
        positives: str = "pair",
        gather_distributed: bool = True,
        optimizer: OptimizerCallable = ADAMW_CLIP,
        scheduler: LRSchedulerCallable | None = WARMUP_COSINE,
    ) -> None:
        super().__init__(
            clip_model, pretrained, num_classes, class_names, templates, context_length, neg_candidates,
            neg_templates, neg_eta, neg_topk, scores, score_kwargs,
        )
        self.save_hyperparameters()
        self.optimizer_config = optimizer
        self.scheduler_config = scheduler
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"model.lam must be a finite non-negative weight, got {lam}")
        if train_template is not None and train_template.count("{}") != 1:
            raise ValueError(f"model.train_template needs exactly one '{{}}', got {train_template!r}")
        if max_logit_scale is not None and not max_logit_scale > 0:
            raise ValueError(f"model.max_logit_scale must be > 0, got {max_logit_scale}")
        if positives not in POSITIVES:
            raise ValueError(f"model.positives must be one of {', '.join(POSITIVES)}, got {positives!r}")
        self._caption_tokens: Tensor | None = None

    # ------------------------------------------------------------------ captions
    @property
    def caption_templates(self) -> list[str]:
        template = self.hparams.train_template
        return [template] if template is not None else list(self.templates)

    def caption_tokens(self) -> Tensor:
        """``[K, T, L]`` token ids of every (class, caption template) pair, tokenised once."""
        if self._caption_tokens is None:
            names, templates = self.class_names, self.caption_templates
            tokens = self.backbone.tokenize([t.format(c) for c in names for t in templates])
            self._caption_tokens = tokens.view(len(names), len(templates), -1)
        return self._caption_tokens

    def captions(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(codes [B], tokens [K*T, L])``: caption index ``label * T + template`` of every sample."""
        tokens = self.caption_tokens()
        n_templates = tokens.shape[1]
        labels = labels.long()
        if n_templates == 1:
            template = torch.zeros_like(labels)
        else:
            template = torch.randint(n_templates, labels.shape, device=labels.device)
        return labels * n_templates + template, tokens.flatten(0, 1)

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        # Mine NegLabel negatives with the weights we start from (the official protocol mines with the
        # pre-trained model once and only re-encodes them after fine-tuning).
        if "neg_cosine" in self._required() and self.negatives.words is None:
            self.mine_negatives()

    def training_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        labels = batch["label"]
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"training labels must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        codes, tokens = self.captions(labels)
        # Encode each distinct caption of the batch once; indexing keeps every sample's gradient path
        # (identical to encoding the B captions one by one).
        unique, inverse = codes.unique(return_inverse=True)
        text = self.backbone.encode_text(tokens[unique.cpu()].to(self.device), normalize=True)[inverse]
        image = self.backbone.encode_image(batch["image"], normalize=True)
        trainer = self._trainer
        if self.hparams.gather_distributed and trainer is not None and trainer.world_size > 1:
            image = self.all_gather(image, sync_grads=True).flatten(0, 1)
            text = self.all_gather(text, sync_grads=True).flatten(0, 1)
            labels = self.all_gather(labels).flatten(0, 1)
        scale = self.backbone.model.logit_scale.exp()
        if trainer is not None:
            self.log("train/logit_scale", scale.detach(), batch_size=len(labels))
        match_ids = labels if self.hparams.positives == "class" else None
        losses = {"contrastive": contrastive_loss(image, text, scale, lam=0.0, match_ids=match_ids)}
        lam = float(self.hparams.lam)
        if lam > 0:
            losses["alignment"] = lam * alignment_regularizer(image, text, scale)
        return losses

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        limit = self.hparams.max_logit_scale
        if limit is not None:
            with torch.no_grad():
                self.backbone.model.logit_scale.clamp_(max=math.log(limit))
        # The cache also notices the parameter version change on its own; being explicit is free.
        self.backbone.invalidate_text_cache()
