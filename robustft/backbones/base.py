"""What every image backbone offers the methods and the datamodule.

A backbone maps a normalised image batch to pooled features. It also says how its inputs must be
prepared (size, mean, std), so the datamodule builds transforms that match the weights instead of
users copying normalisation constants into YAML by hand, and it exposes the features of its
intermediate blocks/stages (:meth:`Backbone.forward_intermediates`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: what ``forward_intermediates(images, indices)`` accepts: ``None`` (all), an int ``n`` (the last n)
#: or a sequence of indices (negative ones count from the end), as timm's ``forward_intermediates``
Indices = int | Sequence[int] | None


@dataclass(frozen=True)
class PreprocessConfig:
    """How images are turned into the tensors a backbone expects."""

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"


def resolve_indices(count: int, indices: Indices, what: str = "feature level") -> list[int]:
    """Non-negative, sorted, de-duplicated indices out of ``count`` feature levels.

    ``None``: all; an int ``n``: the last ``n`` (``1 <= n <= count``); a sequence: each index in
    ``[-count, count - 1]`` (negative ones count from the end, as in Python and timm). Anything else
    raises a ``ValueError`` naming the valid range.
    """
    if indices is None:
        return list(range(count))
    if isinstance(indices, bool) or not isinstance(indices, int | Sequence) or isinstance(indices, str):
        raise ValueError(
            f"indices must be None, an int n (the last n of {count} {what}s) or a list of {what} indices, "
            f"got {indices!r}"
        )
    if isinstance(indices, int):
        if not 1 <= indices <= count:
            raise ValueError(
                f"indices={indices} asks for the last {indices} {what}s, but there are {count}: "
                f"give an int in 1..{count} or a list of indices in {-count}..{count - 1}"
            )
        return list(range(count - indices, count))
    if len(indices) == 0:
        raise ValueError(f"indices is an empty list; give {what} indices in {-count}..{count - 1}")
    resolved = set()
    for item in indices:
        try:
            index = operator.index(item)  # ints, numpy ints, 0-d integer tensors
        except TypeError:
            index = None
        if index is None or isinstance(item, bool):
            raise ValueError(f"{what} index {item!r} is not an int; valid indices are {-count}..{count - 1}")
        if not -count <= index < count:
            raise ValueError(
                f"{what} index {index} is out of range: this backbone has {count} {what}s, "
                f"valid indices are {-count}..{count - 1} (or 0..{count - 1})"
            )
        resolved.add(index % count)
    return sorted(resolved)


class Backbone(nn.Module):
    """Base class: ``forward(images) -> features [B, feature_dim]`` (pooled, before any classifier).

    **Intermediate features** (the contract is the same for every backbone kind)::

        forward_intermediates(images, indices=None) -> dict[int, Tensor]

    returns the features of the requested blocks/stages, keyed by their non-negative index, in
    ascending order of index, each index once. ``indices`` is ``None`` (all), an int ``n`` (the last
    ``n``) or a list of indices (negative ones count from the end); a bad index raises ``ValueError``
    naming the valid range (:func:`resolve_indices`). ``num_intermediates`` is the number of levels.

    * Index ``i`` counts feature levels from the input, in the numbering of the architecture's own
      library: for CNNs (CIFAR ResNet, open_clip's ModifiedResNet, timm ResNets) ``0`` is the stem and
      ``1..`` are the stages, each ``[B, C, H, W]``; for transformers (open_clip ViT towers, timm ViTs)
      ``i`` is the output of block ``i``, as tokens ``[B, T, D]``: the prefix (class/register) tokens
      first, then the patch tokens in raster order. timm models without prefix tokens return what their
      own ``forward_intermediates`` returns (``[B, C, H, W]``).
    * Features are raw block/stage outputs: no final norm, pooling or projection is applied. The last
      level is what the pooled path pools: ``forward(images)`` equals the backbone's pooling applied to
      ``forward_intermediates(images, -1)[num_intermediates - 1]``.
    * The pass stops after the deepest requested level. With patch dropout active (training mode) the
      token features hold only the kept patches.
    """

    feature_dim: int
    preprocess: PreprocessConfig

    def forward(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_intermediates(self) -> int:
        """Number of feature levels ``forward_intermediates`` can return."""
        raise NotImplementedError(f"{type(self).__name__} does not expose intermediate features")

    def forward_intermediates(self, images: Tensor, indices: Indices = None) -> dict[int, Tensor]:
        """Features of the requested blocks/stages ``{index: tensor}`` (see the class docstring)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose intermediate features")
