"""The worked example of docs/adding_a_method.md (the doc embeds this file verbatim; a test checks it).

``TwoViewExample`` is a small method that uses every extension point a new method may need:

- two augmented views per image (``data.n_views: 2``: ``image`` is ``[B, V, C, H, W]``);
- the unlabelled stream (``data.unlabeled``: the batch is ``{"labeled": ..., "unlabeled": ...}``);
- intermediate features (``backbone.forward_intermediates``): an auxiliary head on an earlier stage;
- parameter groups (``param_groups``): the auxiliary head at its own learning-rate multiplier;
- manual optimisation (``automatic_optimization = False``): one optimizer step per view, through the
  base class's ``manual_step`` (logging, NaN check, precision plugin, clipping, scheduler).

Evaluation needs nothing new: ``forward_eval`` is inherited from ``Classifier``, so every OOD score and
the shared report work unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft.methods import Classifier


class TwoViewExample(Classifier):
    """Cross-entropy on each view, an auxiliary cross-entropy on an intermediate stage, and entropy
    minimisation on unlabelled images; one optimizer step per view.

    Args:
        aux_stage: backbone level read by ``forward_intermediates`` for the auxiliary head.
        aux_weight: weight of the auxiliary term.
        unlabeled_weight: weight of the entropy term on the unlabelled stream (when configured).
        aux_lr_mult: learning rate of the auxiliary head relative to the optimizer's ``lr``.
        clip_val: gradient-norm clipping of every manual step (``None``: no clipping).
        **kwargs: everything :class:`~robustft.methods.Classifier` takes (backbone, optimizer, ...).

    Loss terms: ``ce``, ``aux``, and ``entropy`` when an unlabelled stream is configured.
    """

    def __init__(
        self,
        aux_stage: int = 2,
        aux_weight: float = 0.3,
        unlabeled_weight: float = 0.1,
        aux_lr_mult: float = 1.0,
        clip_val: float | None = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.automatic_optimization = False  # one optimizer step per view
        self.manual_clip_val = clip_val  # applied by the base class in every manual_step
        size = self.backbone.preprocess.image_size
        with torch.no_grad():  # the auxiliary head's width: the channels of the chosen stage
            probe = self.backbone.forward_intermediates(torch.zeros(1, 3, size, size), [aux_stage])
        self.aux_head = nn.Linear(probe[aux_stage].shape[1], self.num_classes)

    def param_groups(self) -> list[dict[str, Any]]:
        return [*super().param_groups(),
                {"name": "aux_head", "params": list(self.aux_head.parameters()), "lr_mult": self.hparams.aux_lr_mult}]

    def view_losses(self, images: Tensor, labels: Tensor, unlabeled: Tensor | None) -> dict[str, Tensor]:
        stage = self.hparams.aux_stage
        levels = self.backbone.forward_intermediates(images, [stage, -1])
        pooled = {i: F.adaptive_avg_pool2d(x, 1).flatten(1) for i, x in levels.items()}
        last = max(pooled)  # the last level, pooled, is the backbone's feature vector
        losses = {
            "ce": F.cross_entropy(self.head(pooled[last]), labels),
            "aux": self.hparams.aux_weight * F.cross_entropy(self.aux_head(pooled[stage]), labels),
        }
        if unlabeled is not None:
            log_probs = self(unlabeled).log_softmax(-1)
            losses["entropy"] = self.hparams.unlabeled_weight * -(log_probs.exp() * log_probs).sum(-1).mean()
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labeled, unlabeled = (batch["labeled"], batch["unlabeled"]) if "labeled" in batch else (batch, None)
        images = labeled["image"]
        views = images.unbind(1) if images.ndim == 5 else (images,)
        total = torch.zeros(())
        for v, view in enumerate(views):
            extra = None
            if unlabeled is not None:
                extra = unlabeled["image"][:, v] if unlabeled["image"].ndim == 5 else unlabeled["image"]
            total = self.manual_step(self.view_losses(view, labeled["label"], extra), batch_size=len(view))
        return total
