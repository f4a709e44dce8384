"""What every image backbone offers the methods and the datamodule.

A backbone maps a normalised image batch to pooled features. It also says how its inputs must be
prepared (size, mean, std), so the datamodule builds transforms that match the weights instead of
users copying normalisation constants into YAML by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessConfig:
    """How images are turned into the tensors a backbone expects."""

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"


class Backbone(nn.Module):
    """Base class: ``forward(images) -> features [B, feature_dim]`` (pooled, before any classifier)."""

    feature_dim: int
    preprocess: PreprocessConfig

    def forward(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
