"""``CLIPBackbone``: an open_clip model plus what the CLIP methods share on top of it.

* loading by name, tag or local file (:mod:`robustft.backbones.clip.loading`);
* global, local (MaskCLIP per-patch) and intermediate image features (:mod:`~robustft.backbones.clip.features`);
* its text tower as a :class:`~robustft.backbones.clip.text.TextTower` (``text_tower``);
* tokenisation that refuses to silently truncate;
* a cached zero-shot text classifier (mean of normalised template embeddings, WiSE-FT/CLIP recipe).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft.backbones.base import Backbone, Indices, PreprocessConfig
from robustft.backbones.clip.features import (
    visual_forward_intermediates,
    visual_num_intermediates,
    vit_global_and_local,
)
from robustft.backbones.clip.loading import SCHEMAS, build_open_clip_model
from robustft.backbones.clip.text import TextTower, text_context_length, text_parameters

__all__ = ["CLIPBackbone", "freeze"]

_TEXT_CACHE_SIZE = 8


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``module`` and return it (mode unchanged)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class CLIPBackbone(Backbone):
    """An open_clip CLIP model plus the shared helpers of the CLIP methods.

    Args:
        model_name: an open_clip config name (``'ViT-B-16'``, ``'robustft-micro-vit'``),
            ``'local-dir:/path'`` (folder with ``open_clip_config.json`` and weights) or ``'hf-hub:org/repo'``.
        pretrained: ``None`` (random init), an open_clip tag (``'openai'``, ``'laion2b_s34b_b88k'``; needs
            internet) or a local file: an open_clip state dict, ``{'state_dict': ...}`` or a Lightning
            checkpoint (its key prefix is detected, or given with ``prefix``). Must be ``None`` with a
            ``local-dir:``/``hf-hub:`` name.
        context_length: text context length. ``None`` keeps the model's. With random init any value
            works; with weights it may only shrink the context (first positions kept, see
            ``shrink_text_context``).
        prefix: key prefix of the model's weights inside a checkpoint file (auto-detected when ``None``).
        weights_only: passed to ``torch.load`` for local files.

    ``forward(images)`` returns unnormalised image embeddings (the ``Backbone`` contract);
    ``encode_image``/``encode_text`` normalise by default. The only registered sub-module is ``model``
    (the open_clip model), so state dicts hold open_clip's keys under ``model.``.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        context_length: int | None = None,
        *,
        prefix: str | None = None,
        weights_only: bool = True,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.pretrained = None if pretrained is None else str(pretrained)
        self.model = build_open_clip_model(model_name, self.pretrained, context_length, prefix, weights_only)
        self.context_length = text_context_length(self.model)
        tokenizer_name = model_name if model_name.startswith(SCHEMAS) else model_name.replace("/", "-")
        self.tokenizer = open_clip.get_tokenizer(tokenizer_name, context_length=self.context_length)

        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg.get("size", 224)
        if isinstance(size, (tuple, list)):
            if len(set(size)) != 1:
                raise ValueError(f"Non-square CLIP input size {tuple(size)} is not supported")
            size = size[0]
        self.preprocess = PreprocessConfig(
            image_size=int(size),
            mean=tuple(float(m) for m in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            std=tuple(float(s) for s in cfg.get("std", open_clip.OPENAI_DATASET_STD)),
            interpolation=str(cfg.get("interpolation", "bicubic")),
        )
        embed_dim = getattr(self.model.visual, "output_dim", None)
        if embed_dim is None:
            embed_dim = self.encode_image(torch.zeros(1, 3, size, size), normalize=False).shape[-1]
        self.embed_dim = int(embed_dim)
        self.feature_dim = self.embed_dim
        self._text_cache: OrderedDict[tuple, Tensor] = OrderedDict()
        self._text_cache_version: tuple | None = None
        # a view of the model's text parts, not registered: state dicts keep open_clip's keys only
        try:
            tower: TextTower | None = TextTower.from_open_clip(self.model)
            unsupported = ""
        except NotImplementedError as e:
            tower, unsupported = None, str(e)
        object.__setattr__(self, "_text_tower", tower)
        object.__setattr__(self, "_text_tower_unsupported", unsupported)

    # ---- image side ------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def logit_scale(self) -> Tensor:
        """``exp(model.logit_scale)`` (the learned inverse temperature, 100 for OpenAI weights)."""
        return self.model.logit_scale.exp()

    def forward(self, images: Tensor) -> Tensor:
        return self.encode_image(images, normalize=False)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """Image embeddings ``[B, E]`` (L2-normalised by default)."""
        return self.model.encode_image(images, normalize=normalize)

    def encode_image_with_local(self, images: Tensor, normalize: bool = True) -> tuple[Tensor, Tensor]:
        """``(global [B, E], local [B, P, E])`` in one pass of the vision tower (see ``vit_global_and_local``).

        ``global`` equals ``encode_image(images, normalize)``; ``local`` are MaskCLIP-style per-patch
        embeddings (P = number of patches), normalised per patch when ``normalize``.
        """
        pooled, local = vit_global_and_local(self.model.visual, images)
        if normalize:
            pooled, local = F.normalize(pooled, dim=-1), F.normalize(local, dim=-1)
        return pooled, local

    @property
    def num_intermediates(self) -> int:
        return visual_num_intermediates(self.model.visual)

    def forward_intermediates(self, images: Tensor, indices: Indices = None) -> dict[int, Tensor]:
        """Vision-tower block/stage outputs (see :func:`~robustft.backbones.clip.visual_forward_intermediates`)."""
        return visual_forward_intermediates(self.model.visual, images, indices)

    # ---- text side -------------------------------------------------------------------------------

    @property
    def text_tower(self) -> TextTower:
        """The model's text tower as a :class:`TextTower` sharing its parameters (not a sub-module of
        this backbone). ``copy.deepcopy(backbone.text_tower)`` is an independent copy."""
        if self._text_tower is None:
            raise NotImplementedError(f"No TextTower for '{self.model_name}': {self._text_tower_unsupported}")
        return self._text_tower

    def tokenize(self, texts: str | Sequence[str], *, truncate: bool = False) -> Tensor:
        """Token ids ``[N, context_length]``; raises if a text does not fit (unless ``truncate``).

        For open_clip's BPE ``SimpleTokenizer`` the length is counted exactly (start + words + end);
        for other tokenizers a text overflows when tokenising it with a longer context changes the
        first ``context_length`` ids.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        n = self.context_length
        tok = self.tokenizer
        if truncate:
            return tok(texts, context_length=n)
        if isinstance(tok, open_clip.SimpleTokenizer):
            lengths = [len(tok.encode(t)) + 2 for t in texts]
            bad = [(t, m) for t, m in zip(texts, lengths, strict=True) if m > n]
            tokens = None if bad else tok(texts, context_length=n)
        else:
            tokens = tok(texts, context_length=n)
            longer = tok(texts, context_length=2 * n)
            over = (tokens != longer[:, :n]).any(dim=1).tolist()
            bad = [(t, None) for t, o in zip(texts, over, strict=True) if o]
        if bad:
            shown = "; ".join(
                f"{t!r}" + (f" needs {m} tokens" if m is not None else " does not fit") for t, m in bad[:3]
            )
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            raise ValueError(
                f"{len(bad)} text(s) exceed the context length {n} of '{self.model_name}' (start and end "
                f"tokens included): {shown}{more}. Shorten them or call tokenize(..., truncate=True)."
            )
        return tokens

    def encode_text(self, tokens: Tensor | str | Sequence[str], normalize: bool = True) -> Tensor:
        """Text embeddings ``[N, E]`` of token ids (or of texts, tokenised with ``tokenize``)."""
        if not isinstance(tokens, Tensor):
            tokens = self.tokenize(tokens)
        return self.model.encode_text(tokens.to(self.device), normalize=normalize)

    def _text_version(self) -> tuple:
        # Parameter storage and in-place version counters: optimizer steps, load_state_dict and .to()
        # all change this, so a cached classifier never survives a change of the text tower.
        return tuple((p.data_ptr(), p._version) for p in text_parameters(self.model))

    def invalidate_text_cache(self) -> None:
        """Forget all cached text classifiers."""
        self._text_cache.clear()
        self._text_cache_version = None

    def text_classifier(
        self,
        class_names: Sequence[str],
        templates: Sequence[str | Callable[[str], str]],
        batch_size: int = 1024,
    ) -> Tensor:
        """Zero-shot classifier weights ``[K, E]``: ``normalize(mean_t normalize(E_text(t(c))))``.

        Templates are format strings with one ``{}`` (``"a photo of a {}."``) or callables. Computed
        under ``no_grad`` in the current mode/autocast, then cached.

        Cache policy: the key is (class names, templates, device, autocast state); the cache is
        emptied whenever a version token of the text-tower parameters (storage pointer and in-place
        version counter of each parameter) changes, which covers optimizer steps, ``load_state_dict``
        and device moves; ``invalidate_text_cache()`` empties it explicitly (e.g. after swapping
        parameters by assignment). At most 8 entries are kept (least recently used dropped). The
        returned tensor is shared with the cache: do not modify it in place.
        """
        version = self._text_version()
        if version != self._text_cache_version:
            self._text_cache.clear()
            self._text_cache_version = version
        dev = self.device
        autocast = (torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type))
        key = (tuple(class_names), tuple(templates), str(dev), autocast)
        if key in self._text_cache:
            self._text_cache.move_to_end(key)
            return self._text_cache[key]
        if not class_names or not templates:
            raise ValueError("text_classifier needs at least one class name and one template")
        texts = [t(c) if callable(t) else t.format(c) for c in class_names for t in templates]
        tokens = self.tokenize(texts)
        with torch.no_grad():
            emb = torch.cat([self.encode_text(chunk, normalize=True) for chunk in tokens.split(batch_size)])
            weights = F.normalize(emb.view(len(class_names), len(templates), -1).mean(dim=1), dim=-1)
        self._text_cache[key] = weights
        while len(self._text_cache) > _TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return weights
