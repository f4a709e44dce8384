"""PALM: learning with a mixture of prototypes for OOD detection (Lu et al., ICLR 2024).

Spec: ``../shared/specs/methods-ood-detection.md`` section 4. The pure prototype arithmetic (Sinkhorn,
masks, EMA, the two losses) is in :mod:`robustft.methods.palm.prototypes`; this module is the
LightningModule around it.

Model: a backbone (trainable) plus an MLP projection head ``Linear(D, H), ReLU, Linear(H, 128)`` whose
output is L2-normalised (the *embedding*). ``K * M`` prototypes (``M = prototypes_per_class``, default 6)
live in the registered buffer ``prototypes`` [K*M, 128], interleaved (prototype ``p`` is class ``p mod
K``). They are never trained by gradient: each step moves them by an EMA of their assigned embeddings,
**before** the loss, and the loss reads the updated prototypes (the official order).

Losses per batch of ``V`` augmented views (``data.n_views: 2``, ``data.augmentation: simclr``):
``mle`` (tau 0.1; softmax over all prototypes) and ``proto`` (the prototype-contrastive loss, tau_p 0.5,
weighted by ``proto_weight``, default 1).

Gradient path of ``proto`` (kept on purpose, as in the official code): it is computed on the
*just-updated* prototypes ``normalize(alpha mu + (1 - alpha) W^T z)``, which depend on this batch's
embeddings ``z``, so it reaches the encoder through the ``(1 - alpha)`` term only (scaled by 0.001 at the
default alpha 0.999). Detaching the prototypes first would make ``proto`` a constant. At ``alpha = 1``
it has no gradient at all.

Distributed training: the embeddings and labels of every rank are gathered (in rank order, then laid
out view-major exactly as one process would lay out the concatenated batch) before the Sinkhorn
assignment and the EMA update, so every rank computes the same update from the same global batch and
holds identical prototypes after every step (OpenOOD's port updates from the local shard only). Each
rank's ``mle`` covers its own samples, scaled so that DDP's gradient average equals the gradient of the
mean over the global batch; ``proto`` keeps the gradient path through the local embeddings only and its
gradient is multiplied by the world size (its value is unchanged), which again makes the DDP average
equal the one-process gradient. The prototypes are a registered buffer: checkpoints hold them and
``--ckpt_path`` restores them exactly.

Evaluation (``forward_eval``): ``features`` = the L2-normalised backbone output (what the paper scores),
``embedding`` = the normalised head output, and ``logits`` of a **linear probe** -- PALM has no
classifier (OpenOOD #237), so the ID accuracy of the report comes from a multinomial logistic regression
fitted, at every evaluation, on the frozen ``features`` of the ID training (reference) set; the report's
``meta.id_accuracy`` says so. Scores (higher = ID): ``mahalanobis_global`` (the paper's single-Gaussian
Mahalanobis on normalised backbone features, centred once -- see
:class:`~robustft.ood.scores.distance.GlobalMahalanobisScore` for the difference to the official double
centring), ``knn`` on the ``embedding`` (the paper's alternative; k unverified, 50 here) and the
class-conditional ``mds``.

Unlabelled variant (``supervision: unlabelled``) -- **our reading**, there is no official code (issue
#6 of the official repo is unanswered): the own-class mask is dropped, so each sample is assigned by
Sinkhorn + top-k among all prototypes, ``mle`` is unchanged and ``proto`` loses its class positives (each
prototype is only repelled from the others). The linear probe and ``mds`` still read the ID labels at
evaluation time; drop ``mds`` from ``model.scores`` for a label-free evaluation.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from robustft.backbones import Backbone, TimmBackbone, WeightsError, create_backbone, load_backbone_weights
from robustft.backbones.base import PreprocessConfig
from robustft.methods.base import ConfigMismatchError, OODMethod
from robustft.methods.palm.probe import fit_linear_probe
from robustft.methods.palm.prototypes import (
    assignment_weights,
    class_mask,
    ema_update,
    init_prototypes,
    loss_weights,
    mle_loss,
    prototype_contrastive_loss,
    prototype_labels,
    sinkhorn,
)
from robustft.optim import SGD_CIFAR, WARMUP_COSINE
from robustft.training_state import all_gather_cat, is_distributed

Supervision = Literal["labelled", "unlabelled"]


def cifar_stem_(backbone: Backbone) -> Backbone:
    """Give a timm ResNet the CIFAR stem of the paper, in place: ``conv1`` a 3x3 stride-1 convolution
    with the same output channels, no max-pool, 32x32 input (timm's ``resnet34`` has a 7x7 stride-2 stem
    and a max-pool, which shrink a 32x32 image to 8x8 before the first block). Mean/std are unchanged."""
    model = getattr(backbone, "model", None)
    if not isinstance(backbone, TimmBackbone) or not isinstance(getattr(model, "conv1", None), nn.Conv2d):
        raise ConfigMismatchError(
            f"model.cifar_stem applies to timm ResNets (backbone: timm/resnet18, timm/resnet34, ...), not "
            f"{type(backbone).__name__}; the cifar_resnet* backbones already have a CIFAR stem"
        )
    model.conv1 = nn.Conv2d(model.conv1.in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    backbone.preprocess = PreprocessConfig(
        image_size=32, mean=backbone.preprocess.mean, std=backbone.preprocess.std,
        interpolation=backbone.preprocess.interpolation,
    )
    return backbone


class PALM(OODMethod):
    """Backbone + MLP head to a normalised embedding, trained against a mixture of prototypes per class.

    Args:
        num_classes: number of ID classes ``K``.
        backbone: registered backbone name (``cifar_resnet20``) or ``timm/<model>`` (``timm/resnet34``
            with ``cifar_stem: true`` is the paper's network).
        backbone_weights: local weights file of the backbone (``null``: random init, as the paper).
        backbone_kwargs: extra constructor arguments of the backbone.
        cifar_stem: replace a timm ResNet's 7x7/stride-2 stem and max-pool by a 3x3 stride-1 conv.
        head_dim: embedding dimension (128).
        head_hidden_dim: hidden width of the MLP head (``null``: the backbone's feature dimension, as the
            official ``Linear(512, 512)``).
        prototypes_per_class: ``M`` (official ``cache_size``, 6).
        top_k: prototypes a sample is assigned to, among its own class's (``--k``, 5; capped at ``M``;
            0: all of them, the official ``k = 0`` branch).
        momentum: ``alpha`` of the prototype EMA (``--proto_m``, 0.999).
        temperature: ``tau`` of the MLE loss (``--temp``, 0.1).
        proto_temperature: ``tau_p`` of the prototype-contrastive loss (0.5, hard-coded officially).
        proto_weight: ``lambda_pcon``, weight of the prototype-contrastive loss (1).
        epsilon: Sinkhorn entropy ``epsilon`` (0.05).
        sinkhorn_iterations: Sinkhorn iterations (3).
        supervision: ``labelled`` (the paper's method) or ``unlabelled`` (our reading, module docstring).
        prototype_seed: seed of the prototypes' random initialisation (same on every rank).
        probe_weight_decay, probe_steps: L2 penalty and L-BFGS iterations of the evaluation-time linear
            probe that gives the ID accuracy.
        scores, score_kwargs, optimizer, scheduler: see :class:`~robustft.methods.base.OODMethod`.
            Default scores ``mahalanobis_global``, ``knn`` (on ``embedding``, k 50), ``mds``.

    Loss terms: ``mle``, ``proto`` (``proto_weight`` times the prototype-contrastive loss).
    """

    default_score: ClassVar[str] = "mahalanobis_global"
    default_scores: ClassVar[tuple[str, ...]] = ("mahalanobis_global", "knn", "mds")
    #: score hyper-parameters used when the config gives none for that score
    default_score_kwargs: ClassVar[dict[str, dict[str, Any]]] = {"knn": {"feature_key": "embedding", "k": 50}}

    prototypes: Tensor

    def __init__(
        self,
        num_classes: int = 10,
        backbone: str = "cifar_resnet20",
        backbone_weights: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
        head_dim: int = 128,
        head_hidden_dim: int | None = None,
        prototypes_per_class: int = 6,
        top_k: int = 5,
        momentum: float = 0.999,
        temperature: float = 0.1,
        proto_temperature: float = 0.5,
        proto_weight: float = 1.0,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        supervision: Supervision = "labelled",
        prototype_seed: int = 0,
        probe_weight_decay: float = 1e-4,
        probe_steps: int = 100,
        scores: list[str] | None = None,
        score_kwargs: dict[str, dict[str, Any]] | None = None,
        optimizer: OptimizerCallable = SGD_CIFAR,
        scheduler: LRSchedulerCallable | None = WARMUP_COSINE,
    ) -> None:
        names = list(scores) if scores else list(self.default_scores)
        kwargs = {k: dict(v) for k, v in self.default_score_kwargs.items() if k in names}
        kwargs.update({k: dict(v) for k, v in (score_kwargs or {}).items()})
        super().__init__(num_classes, names, kwargs, optimizer, scheduler)
        self.save_hyperparameters()
        self._check_args()
        # with a CIFAR stem the weights file holds the 3x3 stem: load it after the stem is replaced
        self.backbone = create_backbone(backbone, None if cifar_stem else backbone_weights, **(backbone_kwargs or {}))
        if cifar_stem:
            cifar_stem_(self.backbone)
            if backbone_weights is not None:
                try:
                    load_backbone_weights(self.backbone, backbone_weights)
                except WeightsError as exc:
                    raise WeightsError(f"model.init_args.backbone_weights: {exc}") from None
        dim = self.backbone.feature_dim
        hidden = head_hidden_dim or dim
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, head_dim))
        self.top_k = min(int(top_k), int(prototypes_per_class))
        n_protos = num_classes * prototypes_per_class
        self.register_buffer("prototypes", init_prototypes(n_protos, head_dim, prototype_seed))
        self.register_buffer("prototype_classes", prototype_labels(num_classes, prototypes_per_class), persistent=False)
        # the evaluation-time linear probe: refitted at every evaluation, so not part of checkpoints
        self.register_buffer("probe_weight", torch.zeros(num_classes, dim), persistent=False)
        self.register_buffer("probe_bias", torch.zeros(num_classes), persistent=False)
        self.probe_fitted = False

    def _check_args(self) -> None:
        h = self.hparams
        problems = []
        if h.prototypes_per_class < 1:
            problems.append(f"model.prototypes_per_class must be >= 1, got {h.prototypes_per_class}")
        if h.top_k < 0:
            problems.append(f"model.top_k must be >= 0 (0: every own-class prototype), got {h.top_k}")
        if not 0.0 <= h.momentum <= 1.0:
            problems.append(f"model.momentum (the prototype EMA alpha) must be in [0, 1], got {h.momentum}")
        for name in ("temperature", "proto_temperature", "epsilon"):
            if not h[name] > 0:
                problems.append(f"model.{name} must be > 0, got {h[name]}")
        if h.proto_weight < 0:
            problems.append(f"model.proto_weight must be >= 0, got {h.proto_weight}")
        if h.sinkhorn_iterations < 1:
            problems.append(f"model.sinkhorn_iterations must be >= 1, got {h.sinkhorn_iterations}")
        if h.head_dim < 1 or (h.head_hidden_dim is not None and h.head_hidden_dim < 1):
            problems.append(f"model.head_dim / head_hidden_dim must be >= 1, got {h.head_dim} / {h.head_hidden_dim}")
        if h.supervision not in ("labelled", "unlabelled"):
            problems.append(f"model.supervision: labelled | unlabelled, got {h.supervision!r}")
        if h.probe_steps < 1 or h.probe_weight_decay < 0:
            problems.append(
                f"model.probe_steps must be >= 1 and probe_weight_decay >= 0, got {h.probe_steps}, "
                f"{h.probe_weight_decay}"
            )
        if problems:
            raise ConfigMismatchError("; ".join(problems))

    # ------------------------------------------------------------------ model
    @property
    def preprocess(self) -> PreprocessConfig:
        return self.backbone.preprocess

    def embed(self, features: Tensor) -> Tensor:
        """The normalised ``head_dim`` embedding of backbone features."""
        return F.normalize(self.head(features), dim=1)

    def forward(self, images: Tensor) -> Tensor:
        return self.embed(self.backbone(images))

    def forward_eval(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        raw = self.backbone(batch["image"])
        features = F.normalize(raw.float(), dim=1)
        return {
            "features": features,
            "embedding": self.embed(raw).float(),
            "logits": features @ self.probe_weight.T + self.probe_bias,
        }

    def output_keys(self) -> set[str]:
        return {"features", "embedding", "logits"}

    def classifier_head(self) -> tuple[Tensor, Tensor]:
        """The linear probe on ``features`` (zeros until the first :meth:`fit_reference`)."""
        return self.probe_weight, self.probe_bias

    def param_groups(self) -> list[dict[str, Any]]:
        return [
            {"name": "backbone", "params": list(self.backbone.parameters())},
            {"name": "head", "params": list(self.head.parameters())},
        ]

    # ------------------------------------------------------------------ evaluation: the linear probe
    @property
    def id_accuracy_source(self) -> str:
        """Where the report's ID accuracy comes from (copied into the report's ``meta.id_accuracy``)."""
        return (
            "linear probe: PALM has no classifier; multinomial logistic regression (L-BFGS, "
            f"{self.hparams.probe_steps} iterations, weight decay {self.hparams.probe_weight_decay}) fitted at "
            "evaluation time on the frozen, L2-normalised backbone features of the ID training (reference) set"
        )

    def needs_reference(self) -> bool:
        """Always: the linear probe that gives the ID accuracy is fitted on the reference set."""
        return True

    def fit_reference(self, reference_outputs: dict[str, Tensor] | None) -> None:
        """Fit the linear probe on the reference ``features`` / ``labels``, then the scores (the probe
        first, so that scores reading the head -- ViM, ReAct, ASH -- get the fitted one)."""
        if not reference_outputs or "features" not in reference_outputs or "labels" not in reference_outputs:
            raise ConfigMismatchError(
                "PALM fits its linear probe (the ID accuracy) on the ID training set: evaluate with an "
                "OODDataModule that has data.train"
            )
        weight, bias = fit_linear_probe(
            reference_outputs["features"], reference_outputs["labels"], self.num_classes,
            self.hparams.probe_weight_decay, self.hparams.probe_steps,
        )
        self.probe_weight.copy_(weight.to(self.probe_weight.device))
        self.probe_bias.copy_(bias.to(self.probe_bias.device))
        self.probe_fitted = True
        super().fit_reference(reference_outputs)

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> None:
        """Nearest-prototype accuracy of the embedding (``<stage>/proto_acc``): PALM's own classifier-free
        check during training (the linear probe is only fitted by the OOD evaluation).

        Deliberately does not call :meth:`forward_eval`: the test loop runs *before* the evaluation
        refits the probe, so its ``logits`` would come from a stale (or zero) probe; without
        ``forward_eval`` calls the engine's test-loop capture finds nothing to reuse and forwards the ID
        test set itself after the probe is fitted."""
        if self.hparams.supervision != "labelled":
            return
        sims = self(batch["image"]).float() @ self.prototypes.T
        predicted = self.prototype_classes[sims.argmax(dim=1)]
        acc = (predicted == batch["label"]).float().mean()
        self.log(f"{stage}/proto_acc", acc, prog_bar=True, sync_dist=True, batch_size=len(predicted))

    # ------------------------------------------------------------------ training
    def _global_views(self, z_local: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """``(z [V*N, D] view-major over the global batch, labels [V*N], this rank's rows, world size)``.

        Under DDP the other ranks' embeddings are gathered (detached) around this rank's live ones, so the
        layout equals one process's on the concatenated batch and gradients reach the local samples."""
        b, v = z_local.shape[:2]
        world, offset = 1, 0
        z_all, y_all = z_local, labels
        if is_distributed():
            sizes = all_gather_cat(torch.tensor([b], device=z_local.device))
            world, rank = len(sizes), dist.get_rank()
            offset = int(sizes[:rank].sum())
            gathered = all_gather_cat(z_local)
            z_all = torch.cat([gathered[:offset], z_local, gathered[offset + b :]])
            y_all = all_gather_cat(labels)
        n = z_all.shape[0]
        z = z_all.transpose(0, 1).reshape(v * n, -1)
        rows = (torch.arange(v, device=z.device)[:, None] * n + offset + torch.arange(b, device=z.device)).reshape(-1)
        return z, y_all.repeat(v), rows, world

    def training_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images = batch["image"]
        if images.ndim == 4:  # one view
            images = images[:, None]
        b, v = images.shape[:2]
        emb = self(images.flatten(0, 1)).reshape(b, v, -1)
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return self.prototype_losses(emb.float(), batch["label"])

    def prototype_losses(self, z_local: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Steps 1-6 of the module docstring on this rank's embeddings ``z_local`` [B, V, D] (normalised):
        updates ``prototypes`` in place (same on every rank) and returns the loss terms."""
        h = self.hparams
        z, y, rows, world = self._global_views(z_local, labels.long())
        labelled = h.supervision == "labelled"
        if labelled:
            mask = class_mask(y, self.prototype_classes)
        else:  # our reading of the unlabelled variant: no own-class restriction
            mask = torch.ones(len(z), len(self.prototypes), device=z.device)
        q = sinkhorn(z, self.prototypes, h.epsilon, h.sinkhorn_iterations)
        weights = assignment_weights(q, mask, self.top_k)
        updated = ema_update(self.prototypes, z, weights, h.momentum)
        with torch.no_grad():
            self.prototypes.copy_(updated)
        q_new = sinkhorn(z, updated, h.epsilon, h.sinkhorn_iterations)
        w = loss_weights(q_new, mask, weights, self.top_k)
        # the global mean over V*N rows: each rank sums its own rows; DDP averages over `world` ranks
        mle = mle_loss(z[rows], updated, w[rows], h.temperature).sum() * (world / len(z))
        proto = prototype_contrastive_loss(updated, self.prototype_classes if labelled else None, h.proto_temperature)
        if world > 1:  # value unchanged, gradient x world: the DDP average then equals one process's
            proto = proto.detach() + world * (proto - proto.detach())
        return {"mle": mle, "proto": h.proto_weight * proto}
