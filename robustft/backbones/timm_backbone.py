"""Any timm image model as a feature extractor (classifier removed, pooled features out)."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from robustft.backbones.base import Backbone, Indices, PreprocessConfig, resolve_indices

__all__ = ["TimmBackbone", "timm_forward_intermediates", "timm_num_intermediates"]


def timm_num_intermediates(model: nn.Module) -> int:
    """Number of feature levels of a timm model (``len(model.feature_info)``, timm's own numbering)."""
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise NotImplementedError(
            f"timm model {type(model).__name__} has no forward_intermediates/feature_info (timm >= 1.0 "
            "provides them for most architectures)"
        )
    return len(info)


def timm_forward_intermediates(
    model: nn.Module, images: Tensor, indices: Indices = None
) -> dict[int, Tensor]:
    """``{index: features}`` of a timm model through timm's own ``forward_intermediates``.

    Token models whose ``forward_intermediates`` can return their prefix tokens (ViT, DeiT, EVA, ...) give
    the full block output ``[B, prefix + patches, D]`` (prefix tokens first), like open_clip ViT towers;
    other models give timm's default ``[B, C, H, W]``. Indices follow ``model.feature_info``.
    """
    take = resolve_indices(timm_num_intermediates(model), indices, "feature level")
    params = inspect.signature(model.forward_intermediates).parameters
    kwargs = {"indices": take, "intermediates_only": True}
    if "stop_early" in params:
        kwargs["stop_early"] = True
    tokens = "return_prefix_tokens" in params and "output_fmt" in params
    if tokens:
        kwargs.update(output_fmt="NLC", return_prefix_tokens=True)
    features = model.forward_intermediates(images, **kwargs)
    if len(features) != len(take):  # pragma: no cover - a timm model breaking its own contract
        raise RuntimeError(f"timm returned {len(features)} intermediates for indices {take}")
    out = {}
    for index, feature in zip(take, features, strict=True):
        if isinstance(feature, tuple):  # (patch tokens, prefix tokens)
            feature = torch.cat([feature[1], feature[0]], dim=1)
        out[index] = feature
    return out


class TimmBackbone(Backbone):
    """``timm.create_model(name, num_classes=0)``; preprocessing from timm's data config.

    ``pretrained=True`` asks timm for its default weights (needs internet); offline users pass a local
    weights file to :func:`robustft.backbones.create_backbone` instead. ``forward_intermediates`` goes
    through timm's own (see :func:`timm_forward_intermediates`).
    """

    def __init__(self, model_name: str, pretrained: bool = False, **kwargs) -> None:
        super().__init__()
        import timm
        from timm.data import resolve_data_config

        if model_name not in timm.list_models() and model_name.split(".")[0] not in timm.list_models():
            import difflib

            close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
            raise ValueError(
                f"unknown timm model '{model_name}'" + (f"; did you mean {close}?" if close else "")
            )
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
        self.model_name = model_name
        self.feature_dim = int(self.model.num_features)
        config = resolve_data_config({}, model=self.model)
        self.preprocess = PreprocessConfig(
            image_size=int(config["input_size"][-1]),
            mean=tuple(config["mean"]),
            std=tuple(config["std"]),
            interpolation=config.get("interpolation", "bilinear"),
        )
        classifier = self.model.pretrained_cfg.get("classifier", "fc")
        self.head_prefix = f"model.{classifier}."

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    @property
    def num_intermediates(self) -> int:
        return timm_num_intermediates(self.model)

    def forward_intermediates(self, images: Tensor, indices: Indices = None) -> dict[int, Tensor]:
        return timm_forward_intermediates(self.model, images, indices)
