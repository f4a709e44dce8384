"""Building blocks of :class:`~robustft.methods.levi.LEVI`: view pooling, the small task model G and
the adapting layers A.

No official LEVI code exists; every shape here is our reading of the paper's description (spec
``methods-robust-finetuning.md`` section 1) and is marked [CHOICE] where the description is silent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft.methods.base import ConfigMismatchError

__all__ = [
    "ADAPTER_MODES",
    "TOKEN_POOLS",
    "LayerwiseAdapter",
    "SmallCNN",
    "build_small_model",
    "mlp_head",
    "pool_view",
]

ADAPTER_MODES = ("concat", "per_layer")
TOKEN_POOLS = ("cls", "mean")
#: G of the offline CIFAR recipes: a 3-stage CNN, ~0.1M parameters [CHOICE]
DEFAULT_SMALL_MODEL: dict[str, Any] = {"kind": "cnn", "widths": [32, 64, 128]}


def pool_view(features: Tensor, token_pool: str = "cls", prefix_tokens: int = 1) -> Tensor:
    """One feature level of F as a vector per image ``[B, d_l]``, pooled right away so that only
    ``d_l`` numbers per layer are kept (the spec's memory pitfall).

    ``[B, C, H, W]`` (CNN stages, timm models without prefix tokens): global average pool. ``[B, T, D]``
    tokens (ViT blocks, prefix tokens first): the class token (``cls``) or the mean of the patch tokens
    after the ``prefix_tokens`` prefix tokens (``mean``) [CHOICE]. ``[B, D]``: as is.
    """
    if features.ndim == 4:  # the CIFAR ResNet's own pooling op, so its last level gives forward() exactly
        return F.adaptive_avg_pool2d(features, 1).flatten(1)
    if features.ndim == 3:
        if token_pool == "cls":
            if prefix_tokens < 1:
                raise ConfigMismatchError(
                    "model.token_pool: 'cls' needs a class token, but this backbone's blocks have no prefix "
                    "token; set token_pool: mean"
                )
            return features[:, 0]
        return features[:, prefix_tokens:].mean(dim=1)
    if features.ndim == 2:
        return features
    raise ValueError(f"cannot pool a feature level of shape {tuple(features.shape)}")


class SmallCNN(nn.Module):
    """The default small task model G, trained from scratch [CHOICE]: one ``conv3x3 -> BatchNorm -> ReLU``
    per entry of ``widths``, a 2x2 max-pool between stages, then global average pooling; ``feature_dim``
    (= d_s) is ``widths[-1]``. ``stem_stride`` > 1 downsamples the first convolution (e.g. 4 for 224 px
    inputs, so that G stays cheap next to a ViT-B/16)."""

    def __init__(self, widths: Sequence[int] = (32, 64, 128), stem_stride: int = 1, in_channels: int = 3) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or any(w < 1 for w in widths):
            raise ConfigMismatchError(f"model.small_model.widths must be a non-empty list of positive ints, got {widths}")
        if stem_stride < 1:
            raise ConfigMismatchError(f"model.small_model.stem_stride must be >= 1, got {stem_stride}")
        layers: list[nn.Module] = []
        previous = in_channels
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            stride = stem_stride if i == 0 else 1
            layers += [nn.Conv2d(previous, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            previous = width
        self.body = nn.Sequential(*layers)
        self.feature_dim = widths[-1]

    def forward(self, images: Tensor) -> Tensor:
        return self.body(images).mean(dim=(2, 3))


def build_small_model(spec: Mapping[str, Any] | None) -> nn.Module | None:
    """G from its config, randomly initialised (LEVI trains it from scratch), or ``None`` (G off).

    ``{"kind": "cnn", "widths": [...], "stem_stride": 1}``: :class:`SmallCNN`.
    ``{"kind": "backbone", "name": ..., "kwargs": {...}}``: any backbone of
    :func:`robustft.backbones.create_backbone` without weights, e.g. ``{name: cifar_resnet20, kwargs:
    {depth: 8}}`` for a CIFAR ResNet-8. The result has ``feature_dim`` (d_s).
    """
    if spec is None:
        return None
    spec = dict(spec)
    kind = spec.pop("kind", "cnn")
    if kind == "cnn":
        unknown = set(spec) - {"widths", "stem_stride"}
        if unknown:
            raise ConfigMismatchError(f"model.small_model: unknown keys {sorted(unknown)} for kind 'cnn' (widths, stem_stride)")
        return SmallCNN(spec.get("widths", DEFAULT_SMALL_MODEL["widths"]), int(spec.get("stem_stride", 1)))
    if kind == "backbone":
        from robustft.backbones import create_backbone

        if "name" not in spec:
            raise ConfigMismatchError("model.small_model: kind 'backbone' needs a name (e.g. cifar_resnet20)")
        unknown = set(spec) - {"name", "kwargs"}
        if unknown:
            raise ConfigMismatchError(f"model.small_model: unknown keys {sorted(unknown)} for kind 'backbone' (name, kwargs)")
        return create_backbone(spec["name"], weights=None, **dict(spec.get("kwargs") or {}))
    raise ConfigMismatchError(f"model.small_model.kind: unknown '{kind}'; choose cnn or backbone (or small_model: null)")


def mlp_head(in_features: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    """``Linear -> GELU -> Dropout -> Linear(K)`` (the spec's adapter MLP [CHOICE]); ``hidden = 0``: one
    ``Linear(K)`` (a linear probe on the views)."""
    if hidden == 0:
        return nn.Sequential(nn.Linear(in_features, num_classes))
    return nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))


class LayerwiseAdapter(nn.Module):
    """The adapting layers A over the views ``[h_{l_1}, ..., h_{l_M}, u]`` (F's pooled layers, then G's
    features when G is on).

    Each view is LayerNorm'd first (``view_norm``, one trainable LayerNorm per view): intermediate
    layers and a randomly initialised G live on very different scales, and without it the adapter
    ignores the small model early in training (spec pitfall) [CHOICE].

    * ``concat`` (default): ``A([LN(h_1); ...; LN(h_M); LN(u)])`` with one MLP of input width
      ``sum(d_l) + d_s``.
    * ``per_layer``: ``(1/M) sum_l A_l([LN(h_l); LN(u)])``, one MLP per F layer, logits averaged (the
      other reading of "layer-wise ensemble"); with no F layer, one head on ``LN(u)``.

    Args:
        backbone_dims: d_l of each F layer, in layer order.
        small_dim: d_s of G, or ``None`` when G is off.
    """

    def __init__(
        self,
        backbone_dims: Sequence[int],
        small_dim: int | None,
        num_classes: int,
        mode: str = "concat",
        hidden: int = 512,
        dropout: float = 0.1,
        view_norm: bool = True,
    ) -> None:
        super().__init__()
        if mode not in ADAPTER_MODES:
            raise ConfigMismatchError(f"model.adapter_mode: unknown '{mode}'; choose {' or '.join(ADAPTER_MODES)}")
        if hidden < 0:
            raise ConfigMismatchError(f"model.adapter_hidden must be >= 0 (0: a linear head), got {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigMismatchError(f"model.adapter_dropout must be in [0, 1), got {dropout}")
        self.backbone_dims = [int(d) for d in backbone_dims]
        self.small_dim = None if small_dim is None else int(small_dim)
        if not self.view_dims:
            raise ConfigMismatchError(
                "LEVI has no view: model.layers is empty and model.small_model is null; give F layers, G, or both"
            )
        self.mode = mode
        self.norms = nn.ModuleList(nn.LayerNorm(d) if view_norm else nn.Identity() for d in self.view_dims)
        if mode == "concat":
            widths = [sum(self.view_dims)]
        elif self.backbone_dims:
            widths = [d + (self.small_dim or 0) for d in self.backbone_dims]
        else:
            widths = [self.small_dim or 0]
        self.heads = nn.ModuleList(mlp_head(w, hidden, num_classes, dropout) for w in widths)

    @property
    def view_dims(self) -> list[int]:
        return self.backbone_dims + ([] if self.small_dim is None else [self.small_dim])

    @property
    def input_width(self) -> int:
        """Width of the concatenated normalised views: ``sum(d_l) + d_s``."""
        return sum(self.view_dims)

    def _check(self, views: Sequence[Tensor]) -> None:
        dims = [v.shape[-1] for v in views]
        if dims != self.view_dims:
            raise ValueError(f"the adapter was built for views of widths {self.view_dims}, got {dims}")

    def normalised_views(self, views: Sequence[Tensor]) -> list[Tensor]:
        self._check(views)
        return [norm(v) for norm, v in zip(self.norms, views, strict=True)]

    def adapter_input(self, views: Sequence[Tensor]) -> Tensor:
        """``[LN(h_1); ...; LN(h_M); LN(u)]`` ``[B, sum(d_l) + d_s]`` (the concat MLP's input)."""
        return torch.cat(self.normalised_views(views), dim=1)

    def head_inputs(self, views: Sequence[Tensor]) -> list[Tensor]:
        """The input of each head: the whole concatenation (``concat``), or ``[LN(h_l); LN(u)]`` per layer."""
        normed = self.normalised_views(views)
        if self.mode == "concat":
            return [torch.cat(normed, dim=1)]
        m = len(self.backbone_dims)
        small = normed[m:]  # [LN(u)] or []
        if m == 0:
            return small
        return [torch.cat([normed[i], *small], dim=1) for i in range(m)]

    def forward(self, views: Sequence[Tensor]) -> Tensor:
        """Logits ``[B, K]``: the MLP's in ``concat`` mode, the mean of the heads' in ``per_layer`` mode."""
        logits = [head(x) for head, x in zip(self.heads, self.head_inputs(views), strict=True)]
        return logits[0] if len(logits) == 1 else torch.stack(logits).mean(dim=0)

    def logits_and_features(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits, features, adapter input)`` in one pass. ``features``: in ``concat`` mode the input of
        the last Linear (the hidden activations, or the normalised views when ``hidden = 0``), so feature
        scores and ViM / ReAct read what the classifier reads; in ``per_layer`` mode the adapter input."""
        normed = self.normalised_views(views)
        adapter_input = torch.cat(normed, dim=1)
        if self.mode != "concat":
            return self(views), adapter_input, adapter_input
        x = adapter_input
        for layer in self.heads[0][:-1]:
            x = layer(x)
        return self.heads[0][-1](x), x, adapter_input
