"""LOOK: leave-one-out kNN supervised pre-training that keeps intra-class structure for transfer
(Feng, Jiang, Tang, Jin, Gao; ICLR 2022, arXiv 2110.06014; spec ``methods-robust-finetuning.md`` section 4).

Cross-entropy and SupCon pull every image of a class into one cluster. LOOK only asks that most of an
image's k nearest neighbours (itself excluded) share its label, so a class may keep several modes
(sub-concepts), which is what transfers. No official code exists; this is our MoCo-style reading:

- query encoder = ``backbone`` + ``projector`` (MLP, dropped after pre-training);
- key encoder = an EMA copy of both (:class:`~robustft.training_state.EMAModule`), updated at the start
  of each step (MoCo's order) and never trained by gradients;
- memory = :class:`~robustft.training_state.LabeledQueue` of ``(key, label, sample id)``;
- loss = :func:`~robustft.methods.look.loss.knn_loss` of the query view against the other view's keys
  of the (global) batch plus the queue, leave-one-out by sample id (the dataset position in
  ``batch["index"]``), hard top-k, temperature; then the global batch's keys are enqueued.

With ``data.n_views: 2`` the query is view 0 and the keys come from view 1; with one view the key
encoder sees the same augmented image (its key has the query's id, so it is excluded anyway).

Distributed: keys, labels and ids are all-gathered (no gradient) before they are used as candidates and
enqueued, so every rank holds the same queue and each query sees the global batch, as one process would.

Monitoring: ``train/knn_acc`` (epoch mean) is the leave-one-out soft-kNN accuracy of the queries against
the memory, the upstream kNN monitor; ``train/orphan_frac`` is the fraction of queries without a
same-label neighbour in their top-k. Evaluation (``forward_eval``): ``logits`` are the log soft-kNN class
probabilities of the query embedding over the queue (so ``val/acc`` is the kNN accuracy over the queue on
held-out images), plus ``features`` (backbone) and ``embedding`` (normalised projection) for feature scores.

Transfer: :class:`ExportBackbone` writes the backbone's plain state dict at the end of ``fit``;
``Classifier`` / ``Finetune`` load it with ``backbone_weights: <file>`` (linear probe with
``freeze_backbone: true``). A LOOK ``last.ckpt`` works as ``backbone_weights`` too (its ``backbone.*``
keys are read, the key encoder's ``key_encoder.*`` and the queue are ignored).

Defaults are [CHOICE] for small CPU runs (spec 4(e): k 20-50, tau 0.1, queue = a few batches); the
paper-scale values (k 200, tau 0.07, queue 65,536, m 0.999) are in ``configs/look/imagenet_resnet50.yaml``.
``loss_form: supcon`` with ``k: null`` and ``leave_one_out: false`` is the SupCon-style control.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from robustft.backbones import create_backbone
from robustft.backbones.base import PreprocessConfig
from robustft.io import atomic_torch_save
from robustft.methods.base import OODMethod
from robustft.methods.look.loss import (
    LOSS_FORMS,
    ORPHAN_POLICIES,
    knn_class_probs,
    knn_loss,
    normalize,
    select_neighbours,
)
from robustft.optim import SGD_CIFAR, WARMUP_COSINE
from robustft.training_state import EMAModule, LabeledQueue, all_gather_cat

__all__ = ["LOOK", "Encoder", "ExportBackbone"]


class Encoder(nn.Module):
    """``normalize(projector(backbone(x)))``: the query encoder's structure, copied by the key encoder."""

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, images: Tensor) -> Tensor:
        return normalize(self.projector(self.backbone(images)))


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """The SupCon/MoCo-v2 MLP ``Linear -> ReLU -> Linear``."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class LOOK(OODMethod):
    """LOOK pre-training (module docstring).

    Args:
        num_classes: classes of the (possibly coarse, ``data.label_map``) training labels.
        backbone, backbone_weights, backbone_kwargs: as :class:`~robustft.methods.Classifier`
            (``null`` weights: from scratch).
        proj_dim: output width of the projection head (paper recall: 128).
        proj_hidden_dim: hidden width of the head; ``None`` = the backbone's feature width.
        k: neighbours of the soft kNN [CHOICE, default 50]; ``None``: the whole memory (NCA).
        temperature: tau of the soft vote [CHOICE, default 0.1].
        queue_size: memory entries [CHOICE, default 4096]; also used for evaluation's kNN classifier.
        momentum: EMA momentum m of the key encoder [CHOICE, default 0.99: short runs; paper-scale 0.999].
        orphans: ``guard`` | ``drop`` | ``positive`` (:mod:`robustft.methods.look.loss`) [CHOICE: guard].
        loss_form: ``look`` or ``supcon`` (the SupCon-style control on the same memory).
        leave_one_out: exclude every key with the query's sample id (LOOK: true).
        key_buffers: the key encoder's BatchNorm statistics, ``copy`` (from the query encoder at every
            update) | ``ema`` | ``own`` (MoCo) -- see :class:`~robustft.training_state.EMAModule`.
        delta: guard of ``log(P + delta)``.
        scores, score_kwargs, optimizer, scheduler: see :class:`~robustft.methods.base.OODMethod`.

    Loss terms: ``look`` (or ``supcon``). Logged: ``train/orphan_frac``, ``train/knn_acc`` (epoch),
    ``train/queue_filled``.
    """

    default_score = "msp"
    default_scores = ("msp", "knn")

    def __init__(
        self,
        num_classes: int = 10,
        backbone: str = "cifar_resnet20",
        backbone_weights: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        proj_dim: int = 128,
        proj_hidden_dim: int | None = None,
        k: int | None = 50,
        temperature: float = 0.1,
        queue_size: int = 4096,
        momentum: float = 0.99,
        orphans: str = "guard",
        loss_form: str = "look",
        leave_one_out: bool = True,
        key_buffers: str = "copy",
        delta: float = 1e-12,
        scores: list[str] | None = None,
        score_kwargs: dict[str, dict[str, Any]] | None = None,
        optimizer: OptimizerCallable = SGD_CIFAR,
        scheduler: LRSchedulerCallable | None = WARMUP_COSINE,
    ) -> None:
        super().__init__(num_classes, scores, score_kwargs, optimizer, scheduler)
        self.save_hyperparameters()
        if k is not None and int(k) < 1:
            raise ValueError(f"model.k must be >= 1 (neighbours), or null for the whole memory (NCA); got {k}")
        if not (temperature > 0 and temperature < float("inf")):
            raise ValueError(f"model.temperature must be a finite number > 0, got {temperature}")
        if int(queue_size) < 1:
            raise ValueError(f"model.queue_size must be >= 1 (memory entries), got {queue_size}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"model.momentum must be in [0, 1] (EMA of the key encoder), got {momentum}")
        if orphans not in ORPHAN_POLICIES:
            raise ValueError(f"model.orphans must be one of {', '.join(ORPHAN_POLICIES)}, got {orphans!r}")
        if loss_form not in LOSS_FORMS:
            raise ValueError(f"model.loss_form must be one of {', '.join(LOSS_FORMS)}, got {loss_form!r}")
        if key_buffers not in ("copy", "ema", "own"):
            raise ValueError(f"model.key_buffers must be copy, ema or own, got {key_buffers!r}")
        if int(proj_dim) < 1 or (proj_hidden_dim is not None and int(proj_hidden_dim) < 1):
            raise ValueError(f"model.proj_dim / proj_hidden_dim must be >= 1, got {proj_dim} / {proj_hidden_dim}")
        if not delta > 0:
            raise ValueError(f"model.delta must be > 0 (guard of log(P + delta)), got {delta}")
        self.backbone = create_backbone(backbone, weights=backbone_weights, **(backbone_kwargs or {}))
        width = self.backbone.feature_dim
        self.projector = projection_head(width, int(proj_hidden_dim or width), int(proj_dim))
        self.key_encoder = EMAModule(self.query_encoder(), momentum=momentum, buffers=key_buffers)  # type: ignore[arg-type]
        self.queue = LabeledQueue(int(queue_size), int(proj_dim))

    # ------------------------------------------------------------------ encoders
    def query_encoder(self) -> Encoder:
        """The trained encoder as one module (a view on ``backbone`` + ``projector``, not a copy)."""
        return Encoder(self.backbone, self.projector)

    @torch.no_grad()
    def encode_keys(self, images: Tensor) -> Tensor:
        """Key embeddings [B, D] of the momentum encoder (no gradient)."""
        return self.key_encoder(images).detach()

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.backbone.preprocess

    def param_groups(self) -> list[dict[str, Any]]:
        return [
            {"name": "backbone", "params": list(self.backbone.parameters())},
            {"name": "projector", "params": list(self.projector.parameters())},
        ]

    # ------------------------------------------------------------------ evaluation
    def memory_class_probs(self, embedding: Tensor) -> Tensor:
        """``[B, C]`` soft-kNN class probabilities of ``embedding`` over the queue (no leave-one-out: the
        evaluated images are not in the memory). All zeros while the queue is empty."""
        entries = self.queue.entries()
        if len(entries.keys) == 0:
            return embedding.new_zeros(len(embedding), self.num_classes)
        sims = embedding @ entries.keys.to(embedding.dtype).T
        excluded = torch.zeros_like(sims, dtype=torch.bool)
        neigh = select_neighbours(sims, entries.labels, excluded, self.hparams.k)
        return knn_class_probs(neigh, self.hparams.temperature, self.num_classes)

    def forward_eval(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        features = self.backbone(batch["image"])
        embedding = normalize(self.projector(features))
        probs = self.memory_class_probs(embedding.float())
        return {"logits": torch.log(probs + self.hparams.delta), "features": features, "embedding": embedding}

    def output_keys(self) -> set[str]:
        return {"logits", "features", "embedding"}

    # ------------------------------------------------------------------ training
    @staticmethod
    def split_views(images: Tensor) -> tuple[Tensor, Tensor]:
        """(query view, key view): views 0 and 1 of ``[B, V, C, H, W]``; one view serves both."""
        if images.ndim == 5:
            return images[:, 0], images[:, 1] if images.shape[1] > 1 else images[:, 0]
        return images, images

    def training_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if "index" not in batch:
            raise ValueError("LOOK needs the sample ids (batch['index']) for leave-one-out; use robustft's OODDataModule")
        labels, ids = batch["label"].long(), batch["index"].long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"training labels must lie in [0, {self.num_classes}) (model.num_classes), got "
                f"{int(labels.min())}..{int(labels.max())}"
            )
        query_images, key_images = self.split_views(batch["image"])
        queries = self.query_encoder()(query_images)
        self.key_encoder.update(self.query_encoder())  # MoCo's order: momentum update, then keys
        keys = self.encode_keys(key_images)
        # the global batch's keys, labels and ids (rank order; identity in one process)
        keys, key_labels, key_ids = all_gather_cat(keys), all_gather_cat(labels), all_gather_cat(ids)
        hp = self.hparams
        out = knn_loss(
            queries.float(), labels, ids,
            torch.cat([keys.float(), self.queue.keys.float()]),
            torch.cat([key_labels, self.queue.labels]),
            torch.cat([key_ids, self.queue.ids]),
            key_valid=torch.cat([torch.ones_like(key_labels, dtype=torch.bool), self.queue.valid_mask()]),
            k=hp.k, temperature=hp.temperature, orphans=hp.orphans, form=hp.loss_form,
            leave_one_out=hp.leave_one_out, num_classes=self.num_classes, delta=hp.delta,
        )
        self.queue.enqueue(keys, key_labels, key_ids, gather=False)  # after the loss: the pre-step memory
        self._log_monitors(out.orphan, out.probs, labels)
        return {hp.loss_form: out.loss}

    def _log_monitors(self, orphan: Tensor, probs: Tensor, labels: Tensor) -> None:
        if self._trainer is None:
            return
        n = len(labels)
        self.log("train/orphan_frac", orphan.float().mean(), batch_size=n, on_step=True, on_epoch=True)
        correct = (probs.argmax(1) == labels) & (probs.sum(1) > 0)
        self.log("train/knn_acc", correct.float().mean(), batch_size=n, on_step=False, on_epoch=True,
                 prog_bar=True, sync_dist=True)
        self.log("train/queue_filled", self.queue.num_filled.float(), batch_size=n)


class ExportBackbone(pl.Callback):
    """Write ``pl_module.backbone.state_dict()`` (CPU tensors, plain dict) at the end of ``fit``.

    ``Classifier`` / ``Finetune`` load the file with ``backbone_weights: <path>`` (a linear probe with
    ``freeze_backbone: true``). Works for any method with a ``backbone`` (LOOK, Classifier, ...).

    Args:
        path: output file; ``None``: ``<trainer.default_root_dir>/backbone.pt``. Written atomically by
            global rank 0.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        self.path = None if path is None else Path(path)

    def target(self, trainer: pl.Trainer) -> Path:
        return self.path if self.path is not None else Path(trainer.default_root_dir) / "backbone.pt"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not isinstance(getattr(pl_module, "backbone", None), nn.Module):
            raise TypeError(f"ExportBackbone needs a method with a 'backbone' module, got {type(pl_module).__name__}")

    @staticmethod
    def export(pl_module: pl.LightningModule, path: str | os.PathLike[str]) -> Path:
        state = {k: v.detach().cpu().contiguous() for k, v in pl_module.backbone.state_dict().items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return atomic_torch_save(state, path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.export(pl_module, self.target(trainer))
