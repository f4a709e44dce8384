"""Write the plain open_clip weights of a CLIP method at the end of ``fit``.

A Lightning checkpoint stores the CLIP model under the LightningModule's attribute prefix
(``backbone.model.``) next to optimizer state and hyper-parameters. ``ExportCLIPWeights`` writes just
``model.state_dict()`` of the open_clip model, so ``pretrained: <path>`` (``CLIPBackbone``,
``open_clip.create_model(..., pretrained=<path>)``) loads it directly, e.g. the tiny CLIP pre-trained by
``configs/clip/tiny_pretrain_cifar10.yaml`` for the zero-shot and CMA recipes.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from robustft.io import atomic_torch_save

__all__ = ["ExportCLIPWeights", "save_state_dict_atomic"]


def save_state_dict_atomic(state: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file in the target folder, fsync, then ``os.replace`` (atomic)."""
    return atomic_torch_save(state, path)


def _open_clip_model(pl_module: pl.LightningModule) -> nn.Module:
    backbone = getattr(pl_module, "backbone", None)
    model = getattr(backbone, "model", None)
    if not isinstance(model, nn.Module) or not hasattr(model, "encode_text"):
        raise TypeError(
            f"ExportCLIPWeights needs a CLIP method (a 'backbone' CLIPBackbone holding an open_clip model), "
            f"got {type(pl_module).__name__}"
        )
    return model


class ExportCLIPWeights(pl.Callback):
    """Save the open_clip ``state_dict`` (CPU tensors) of ``pl_module.backbone.model`` to ``path`` at fit end.

    Args:
        path: output file (``.pt``); parent folders are created. Written atomically by global rank 0.
            ``None``: ``<trainer.default_root_dir>/open_clip_weights.pt``.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        self.path = None if path is None else Path(path)

    def target(self, trainer: pl.Trainer) -> Path:
        return self.path if self.path is not None else Path(trainer.default_root_dir) / "open_clip_weights.pt"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            _open_clip_model(pl_module)  # fail before training, not after it

    def export(self, pl_module: pl.LightningModule, path: str | os.PathLike[str]) -> Path:
        model = _open_clip_model(pl_module)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return save_state_dict_atomic(state, path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            path = self.export(pl_module, self.target(trainer))
            rank_zero_info(f"ExportCLIPWeights: wrote open_clip weights to {path}")
        trainer.strategy.barrier("export_clip_weights")
