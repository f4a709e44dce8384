"""A CLIP image tower as an ordinary :class:`~robustft.backbones.base.Backbone` (``backbone: clip:<name>``).

WiSE-FT / BANG fine-tune only the image encoder of CLIP plus a linear head; the text tower is needed
once, to build the zero-shot head, and is then dropped (``mlfoundations/wise-ft`` deletes it from the
classifier too). :class:`CLIPImageBackbone` therefore registers only open_clip's ``visual`` module, so
its ``state_dict`` -- and hence every fine-tuned checkpoint and every weight average -- holds the image
tower alone, while :meth:`text_classifier` and :attr:`logit_scale` stay usable until
:meth:`release_text_tower` is called.

``forward`` returns the *unnormalised* image embedding (``CLIP.encode_image(normalize=False)``);
normalising it before the head is the method's decision (``Finetune.normalize_features``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from robustft.backbones.base import Backbone, Indices
from robustft.backbones.clip import CLIPBackbone
from robustft.backbones.clip.features import visual_forward_intermediates, visual_num_intermediates

__all__ = ["CLIPImageBackbone"]


class CLIPImageBackbone(Backbone):
    """The image encoder of an open_clip model.

    Args:
        model_name: open_clip model name (``ViT-B-16``, ``robustft-micro-vit``, ...).
        pretrained: an open_clip pretrained tag (online users), a local weights file (open_clip state
            dict or a Lightning checkpoint holding one) or ``None`` (random init, tests only).
        **kwargs: passed to :class:`~robustft.backbones.clip.CLIPBackbone` (``context_length``,
            ``prefix``, ``weights_only``).

    Attributes:
        feature_dim: the CLIP embedding dimension.
        preprocess: CLIP's own input size / mean / std / interpolation.
        logit_scale_value: ``exp(logit_scale)`` of the loaded weights (a float, kept after the text
            tower is released).
    """

    def __init__(self, model_name: str, pretrained: str | None = None, **kwargs) -> None:
        super().__init__()
        clip = CLIPBackbone(model_name, pretrained, **kwargs)
        self.model_name = model_name
        self.visual = clip.model.visual
        self.feature_dim = clip.embed_dim
        self.preprocess = clip.preprocess
        self.logit_scale_value = float(clip.logit_scale.detach())
        # held by reference, not registered: its text tower must not enter state dicts or optimisers
        object.__setattr__(self, "_clip", clip)

    def forward(self, images: Tensor) -> Tensor:
        return self.visual(images)

    @property
    def num_intermediates(self) -> int:
        return visual_num_intermediates(self.visual)

    def forward_intermediates(self, images: Tensor, indices: Indices = None) -> dict[int, Tensor]:
        """Vision-tower block/stage outputs (see :func:`~robustft.backbones.clip.visual_forward_intermediates`)."""
        return visual_forward_intermediates(self.visual, images, indices)

    @property
    def has_text_tower(self) -> bool:
        return self._clip is not None

    def _require_clip(self) -> CLIPBackbone:
        if self._clip is None:
            raise RuntimeError(
                f"the text tower of '{self.model_name}' was released after the zero-shot head was built; "
                "build text classifiers before calling release_text_tower()"
            )
        return self._clip

    def text_classifier(
        self, class_names: Sequence[str], templates: Sequence[str | Callable[[str], str]]
    ) -> Tensor:
        """Normalised zero-shot class embeddings ``[K, E]`` (see ``CLIPBackbone.text_classifier``).

        The text tower is moved to the image tower's device for the computation.
        """
        clip = self._require_clip()
        device = next(self.visual.parameters()).device
        clip.to(device)
        return clip.text_classifier(list(class_names), list(templates)).detach().clone()

    def release_text_tower(self) -> None:
        """Drop the reference to the full CLIP model; only the image tower stays in memory."""
        object.__setattr__(self, "_clip", None)
