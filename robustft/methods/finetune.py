"""Fine-tuning for WiSE-FT, BANG and model soups: end-to-end or linear-classifier, any backbone.

:class:`Finetune` is the :class:`~robustft.methods.classifier.Classifier` (backbone + linear head,
same training step, same evaluation contract) with what the weight-averaging methods need on top
(spec ``methods-robust-finetuning.md`` sections 2-3):

* **CLIP image towers** (``backbone: clip:<open_clip model>``, ``backbone_weights``: a local open_clip
  weights file or a pretrained tag) next to CIFAR ResNets and timm models;
* a **zero-shot head** (``zero_shot_head: true``): for class ``c`` the mean of the normalised text
  embeddings of ``template(c)`` over the templates, renormalised, times ``exp(logit_scale)`` of the
  pre-trained CLIP; bias 0. Image features are L2-normalised before the head (``normalize_features``,
  on by default for CLIP) and no separate temperature is learned: the temperature is folded into the
  head once, exactly as ``mlfoundations/wise-ft`` (``ClassificationHead(normalize=True)``). After the
  head is built the text tower is dropped, so checkpoints (and weight averages) hold the image tower
  and the head only;
* **linear-classifier mode** (``freeze_backbone: true``, WiSE-FT "LC"): only the head trains and the
  backbone stays in eval mode (frozen BatchNorm statistics);
* **BANG's soft targets**: ``label_smoothing`` ε and ``mixup_alpha`` a, giving the loss
  ``-mean_i Σ_c q̃_ic log softmax(f(x̃_i))_c`` with ``q = (1-ε) onehot + ε/K`` mixed with
  ``λ ~ Beta(a, a)``. With ``mixup_alpha: 0`` the step is the Classifier's own cross-entropy (with
  ``label_smoothing=ε``), so ε = 0 and a = 0 give exactly the plain CE training loss.

WiSE-FT / BANG are then ``python -m robustft average`` (or the ``WeightAveraging`` callback) over
θ0 = the model as configured (or a saved zero-shot checkpoint) and θ1 = the fine-tuned checkpoint.
Set the paper's recipe in the config (``optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 3.0e-5,
weight_decay: 0.1}}``, ``scheduler: {class_path: robustft.optim.WarmupCosine, init_args: {warmup_steps:
500}}``, ``trainer.gradient_clip_val: 1.0``); the constructor defaults are the Classifier's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from robustft.losses import mixup, smooth_labels, soft_cross_entropy
from robustft.methods.base import ConfigMismatchError
from robustft.methods.classifier import Classifier
from robustft.optim import SGD_CIFAR, WARMUP_COSINE

__all__ = ["Finetune", "resolve_class_names", "resolve_templates"]

#: WiSE-FT's ``simple_template`` (``src/templates/simple_template.py``)
SIMPLE_TEMPLATE = ("a photo of a {}.",)


def resolve_templates(templates: Sequence[str] | str | None) -> list[str | Callable[[str], str]]:
    """Prompt templates: a list of ``"... {} ..."`` strings, or a named set.

    Named sets: ``simple`` (``"a photo of a {}."``, the default), ``openai_imagenet`` (open_clip's 80
    OpenAI ImageNet templates, the WiSE-FT paper's), ``simple_imagenet`` (open_clip's short list).
    """
    if templates is None or templates == "simple":
        return list(SIMPLE_TEMPLATE)
    if isinstance(templates, str):
        import open_clip

        named = {
            "openai_imagenet": open_clip.OPENAI_IMAGENET_TEMPLATES,
            "simple_imagenet": open_clip.SIMPLE_IMAGENET_TEMPLATES,
        }
        if templates not in named:
            raise ConfigMismatchError(
                f"model.templates: unknown template set '{templates}'; give a list of strings with one "
                "'{}' or one of: simple, " + ", ".join(named)
            )
        return list(named[templates])
    out = list(templates)
    bad = [t for t in out if not isinstance(t, str) or t.count("{}") != 1]
    if not out or bad:
        raise ConfigMismatchError(
            f"model.templates: every template needs exactly one '{{}}' for the class name, got {bad or out}"
        )
    return out


def resolve_class_names(class_names: Sequence[str] | str | None, num_classes: int) -> list[str]:
    """Class names for the zero-shot head: a list, or ``imagenet`` (open_clip's 1000 names)."""
    if class_names is None:
        raise ConfigMismatchError(
            "model.zero_shot_head needs model.class_names (e.g. the 10 CIFAR-10 names, in label order, or "
            "'imagenet')"
        )
    if isinstance(class_names, str):
        if class_names != "imagenet":
            raise ConfigMismatchError(f"model.class_names: unknown set '{class_names}'; give a list or 'imagenet'")
        import open_clip

        names = list(open_clip.IMAGENET_CLASSNAMES)
    else:
        names = [str(c) for c in class_names]
    if len(names) != num_classes:
        raise ConfigMismatchError(f"model.class_names has {len(names)} names but model.num_classes is {num_classes}")
    return names


class Finetune(Classifier):
    """Backbone + linear head fine-tuned end-to-end (or head only) with optional Mixup / label smoothing.

    Args:
        num_classes: number of ID classes.
        backbone: ``cifar_resnet20`` (any registered name), ``timm/<model>`` or ``clip:<open_clip model>``.
        backbone_weights: local weights file (or open_clip tag / ``timm-pretrained`` for online users).
            A classifier stored with CIFAR/timm weights initialises the head (the pre-trained θ0).
        backbone_kwargs: extra constructor arguments of the backbone.
        freeze_backbone: linear-classifier (LC) fine-tuning: train the head only.
        label_smoothing: ε of the smoothed targets (BANG: 0.1).
        mixup_alpha: Beta(a, a) concentration of Mixup; 0 disables it (BANG: 0.2-1.0).
        zero_shot_head: initialise the head from CLIP's text tower (CLIP backbones only).
        class_names: class names in label order for the zero-shot head, or ``imagenet``.
        templates: prompt templates (list of ``"... {} ..."``) or ``simple`` / ``openai_imagenet`` /
            ``simple_imagenet``.
        normalize_features: L2-normalise features before the head; ``None`` = on for CLIP backbones
            (WiSE-FT), off otherwise.
        backbone_lr_mult: the backbone's learning rate relative to the head's (parameter groups).
        scores, score_kwargs, optimizer, scheduler: see :class:`~robustft.methods.base.OODMethod`.

    Loss terms: ``ce`` (cross-entropy against the smoothed and, with Mixup, mixed targets).
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
        mixup_alpha: float = 0.0,
        zero_shot_head: bool = False,
        class_names: list[str] | str | None = None,
        templates: list[str] | str | None = None,
        normalize_features: bool | None = None,
        backbone_lr_mult: float = 1.0,
        scores: list[str] | None = None,
        score_kwargs: dict[str, dict[str, Any]] | None = None,
        optimizer: OptimizerCallable = SGD_CIFAR,
        scheduler: LRSchedulerCallable | None = WARMUP_COSINE,
    ) -> None:
        super().__init__(
            num_classes, backbone, backbone_weights, backbone_kwargs, freeze_backbone, label_smoothing,
            backbone_lr_mult, scores, score_kwargs, optimizer, scheduler,
        )
        self.save_hyperparameters()
        if not (mixup_alpha >= 0.0 and mixup_alpha < float("inf")):
            raise ConfigMismatchError(f"model.mixup_alpha must be a finite number >= 0, got {mixup_alpha}")
        is_clip = hasattr(self.backbone, "text_classifier")
        self.normalize_features = is_clip if normalize_features is None else bool(normalize_features)
        if zero_shot_head:
            if not is_clip:
                raise ConfigMismatchError(
                    f"model.zero_shot_head needs a CLIP backbone ('clip:<open_clip model>'), got '{backbone}'"
                )
            self.init_zero_shot_head(resolve_class_names(class_names, num_classes), resolve_templates(templates))
        if is_clip:
            self.backbone.release_text_tower()

    @torch.no_grad()
    def init_zero_shot_head(self, class_names: Sequence[str], templates: Sequence[Any]) -> None:
        """Head weight ``exp(logit_scale) · normalize(mean_t normalize(E_text(t(c))))``, bias 0."""
        if not self.normalize_features:
            raise ConfigMismatchError(
                "model.zero_shot_head with normalize_features: false would not reproduce the zero-shot "
                "classifier (CLIP compares normalised image embeddings); leave normalize_features unset"
            )
        weights = self.backbone.text_classifier(class_names, templates).float()
        scale = self.backbone.logit_scale_value
        self.head.weight.copy_(scale * weights.to(self.head.weight))
        self.head.bias.zero_()

    # ------------------------------------------------------------------ forward
    def embed(self, images: Tensor) -> Tensor:
        """Backbone features as the head sees them (L2-normalised when ``normalize_features``)."""
        features = self.backbone(images)
        return F.normalize(features, dim=-1) if self.normalize_features else features

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.embed(images))

    def forward_eval(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        features = self.embed(batch["image"])
        return {"logits": self.head(features), "features": features}

    # ------------------------------------------------------------------ training
    def training_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Cross-entropy (label-smoothed) without Mixup; soft-target CE on mixed batches with it."""
        alpha = float(self.hparams.mixup_alpha)
        if alpha <= 0.0:
            return super().training_losses(batch)
        images, labels = batch["image"], batch["label"]
        targets = smooth_labels(labels, self.num_classes, float(self.hparams.label_smoothing), dtype=torch.float32)
        images, targets, lam = mixup(images, targets.to(images.device), alpha)
        if self._trainer is not None:
            self.log("train/mixup_lambda", lam, batch_size=len(labels))
        logits = self(images)
        return {"ce": soft_cross_entropy(logits.float(), targets)}
