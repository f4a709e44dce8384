"""The CLIP layer every CLIP method shares (MCM, GL-MCM, CoOp/Local-Prompt, CLIPN, CMA, WiSE-FT ...).

``CLIPBackbone`` wraps an ``open_clip`` model and adds what the methods need on top of the plain
``encode_image`` / ``encode_text``:

* loading from a tag, a local open_clip state dict *or* a Lightning checkpoint (key prefix detected),
  with errors that name close model names, available tags, or the first mismatching keys;
* global **and** MaskCLIP-style local (per-patch) image features in one pass of the vision tower
  (GL-MCM, Local-Prompt);
* tokenisation that refuses to silently truncate;
* a cached zero-shot text classifier (mean of normalised template embeddings, WiSE-FT/CLIP recipe).

``PromptTextEncoder`` replays the text tower on prompt *embeddings* and ``PromptLearner`` is CoOp on
top of it. Both hold the open_clip model by reference only (it is not registered as a sub-module), so
their ``parameters()`` / ``state_dict()`` contain only what they own (``ctx`` and the prompt buffers);
the LightningModule that owns the ``CLIPBackbone`` is responsible for its device and checkpointing.

Tiny architectures for tests and CPU pre-training (``robustft-micro-vit``, ``robustft-tiny-vit``) live in
``robustft/assets/clip_configs`` and are registered with open_clip when this module is imported.
"""

from __future__ import annotations

import difflib
import logging
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import (
    CustomResidualAttentionBlock,
    ResidualAttentionBlock,
    TextTransformer,
    VisionTransformer,
)
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from robustft.backbones.base import Backbone, PreprocessConfig

__all__ = [
    "CLIP_CONFIG_DIR",
    "CLIPBackbone",
    "PromptLearner",
    "PromptTextEncoder",
    "freeze",
    "load_clip_weights",
    "register_clip_configs",
    "vit_global_and_local",
]

log = logging.getLogger(__name__)

CLIP_CONFIG_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip_configs"
_SCHEMAS = ("local-dir:", "hf-hub:")
_TEXT_CACHE_SIZE = 8


# --------------------------------------------------------------------------------------------------
# Config registration
# --------------------------------------------------------------------------------------------------


def register_clip_configs(path: str | os.PathLike[str] = CLIP_CONFIG_DIR) -> list[str]:
    """Register the JSON model configs in ``path`` with open_clip (idempotent); return their names.

    ``open_clip.add_model_config`` appends to a global search path and rescans it; calling it twice
    with the same folder would only duplicate the path, so it is skipped when every config of the
    folder is already known under its file stem.
    """
    path = Path(path)
    names = sorted(p.stem for p in path.glob("*.json")) if path.is_dir() else [path.stem]
    known = set(open_clip.list_models())
    if not all(name in known for name in names):
        open_clip.add_model_config(path)
    return names


register_clip_configs()


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``module`` and return it (mode unchanged)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _text_tower(model: nn.Module) -> nn.Module:
    """The module holding ``token_embedding``/``positional_embedding``/... of an open_clip model.

    ``CLIP`` copies the text tower's parts onto itself; ``CustomTextCLIP``/``CoCa`` keep it in
    ``model.text``. Only open_clip's own ``TextTransformer`` is supported (HF towers differ entirely).
    """
    text = getattr(model, "text", None)
    if text is None:
        if not hasattr(model, "token_embedding"):
            raise NotImplementedError(f"{type(model).__name__} has no open_clip text tower")
        return model
    if not isinstance(text, TextTransformer):
        raise NotImplementedError(
            f"Text tower {type(text).__name__} is not open_clip's TextTransformer (e.g. a Hugging Face "
            "tower); prompt learning and context resizing only support open_clip's own text transformer."
        )
    return text


def _text_parameters(model: nn.Module) -> list[nn.Parameter]:
    tower = _text_tower(model)
    if tower is not model:
        return list(tower.parameters())
    params: list[nn.Parameter] = []
    for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
        part = getattr(model, name, None)
        if isinstance(part, nn.Parameter):
            params.append(part)
        elif isinstance(part, nn.Module):
            params.extend(part.parameters())
    return params


def _first(items: Sequence[Any], n: int = 5) -> str:
    shown = ", ".join(str(i) for i in list(items)[:n])
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return shown + more


class _DropRandomInitWarning(logging.Filter):
    """Hide open_clip's 'initialized randomly' warning while we load the weights ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


# --------------------------------------------------------------------------------------------------
# Weight loading
# --------------------------------------------------------------------------------------------------


def _read_checkpoint(path: Path, weights_only: bool) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=weights_only)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"Could not load {path} with torch.load(weights_only={weights_only}): {e}. If the file is a "
                "trusted checkpoint that stores Python objects (e.g. some Lightning hyper-parameters), "
                "pass weights_only=False."
            ) from e
    if isinstance(obj, torch.jit.ScriptModule):
        obj = obj.state_dict()
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not contain a state dict (a mapping of names to tensors)")
    return obj


def _detect_prefix(keys: Sequence[str], expected: set[str]) -> str:
    """The key prefix under which ``keys`` hold the model's expected keys ('' if none is needed).

    Every ``'.'`` boundary of every key proposes the prefix before it when the rest is an expected
    key; the prefix covering the most expected keys wins. Two prefixes covering the same maximal number
    (e.g. ``clip.`` and ``teacher.clip.``) are ambiguous and must be chosen with ``prefix=``.
    """
    counts: dict[str, int] = {}
    for key in keys:
        if key in expected:
            counts[""] = counts.get("", 0) + 1
        for i, ch in enumerate(key):
            if ch == "." and key[i + 1 :] in expected:
                counts[key[: i + 1]] = counts.get(key[: i + 1], 0) + 1
    if not counts:
        raise ValueError(
            "No key of the checkpoint matches the model (even after stripping a prefix). Checkpoint keys: "
            f"{_first(sorted(keys))}; model keys: {_first(sorted(expected))}."
        )
    best = max(counts.values())
    winners = sorted(p for p, c in counts.items() if c == best)
    if len(winners) > 1:
        raise ValueError(
            f"Ambiguous key prefix in checkpoint: {', '.join(repr(w) for w in winners)} all hold {best} "
            "model keys; pass prefix=... to choose one."
        )
    return winners[0]


def load_clip_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    prefix: str | None = None,
    weights_only: bool = True,
) -> str:
    """Load an open_clip state dict (or a Lightning checkpoint holding one) into ``model``; strict.

    ``path`` may hold a plain open_clip state dict, ``{'state_dict': ...}`` or a Lightning ``.ckpt``
    whose keys carry the LightningModule attribute prefix (``clip.model.``, ``module.``, ...). The prefix
    is detected unless given; keys outside it are ignored. Missing/unexpected keys and shape
    mismatches are reported by name *before* loading, as one ``ValueError``. ``.npz``/``.npy``
    (big_vision) files are handed to ``open_clip.load_checkpoint``. Returns the prefix used.
    """
    path = Path(path)
    if path.suffix in (".npz", ".npy"):
        open_clip.load_checkpoint(model, str(path), strict=True)
        return ""
    state = _read_checkpoint(path, weights_only)
    target = model.state_dict()
    expected = set(target)
    if prefix is None:
        prefix = _detect_prefix(list(state), expected)
    elif not any(k.startswith(prefix) for k in state):
        raise ValueError(f"No key of {path} starts with prefix {prefix!r}; keys: {_first(sorted(state))}")
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    # The same compatibility massaging as open_clip.load_checkpoint (minus position-embedding resizing,
    # which would hide an architecture mismatch behind an interpolation).
    state = open_clip.factory.convert_state_dict(model, state)
    if "positional_embedding" in state and "positional_embedding" not in expected:
        state = open_clip.model.convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        if key in state and key in target and state[key].ndim != target[key].ndim:
            state[key] = state[key].reshape(target[key].shape)

    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sorted(expected & set(state))
        if state[k].shape != target[k].shape
    ]
    if missing or unexpected or shapes:
        where = f" (after stripping prefix {prefix!r})" if prefix else ""
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {'; '.join(shapes[:5])}")
        raise ValueError(
            f"Weights in {path}{where} do not match the model architecture: " + " | ".join(parts) + "."
        )
    model.load_state_dict(state, strict=True)
    return prefix


def _shrink_text_context(model: nn.Module, context_length: int) -> None:
    """Keep the first ``context_length`` text positions (positional embedding and causal mask).

    With a causal mask, a token only sees earlier positions, so for prompts that fit, the truncated
    model gives the same features as the full one (unlike open_clip's interpolation of the embedding).
    """
    tower = _text_tower(model)
    if getattr(tower, "cls_emb", None) is not None:
        raise NotImplementedError("Changing the context length of a text tower with a class token")
    pos = tower.positional_embedding
    tower.positional_embedding = nn.Parameter(pos.detach()[:context_length].clone(), pos.requires_grad)
    mask_owner = model if tower is model else tower
    if getattr(mask_owner, "attn_mask", None) is not None:
        mask_owner.attn_mask = mask_owner.attn_mask[:context_length, :context_length].clone()
    for obj in {id(model): model, id(tower): tower}.values():
        if hasattr(obj, "context_length"):
            obj.context_length = context_length
        if hasattr(obj, "num_pos"):
            obj.num_pos = context_length


def _context_length_of(model: nn.Module) -> int:
    return int(_text_tower(model).positional_embedding.shape[0])


# --------------------------------------------------------------------------------------------------
# Local (per-patch) image features
# --------------------------------------------------------------------------------------------------


def _value_path(block: nn.Module, x: Tensor) -> Tensor:
    """MaskCLIP value path of one residual block: attention replaced by each token's own value."""
    if isinstance(block, ResidualAttentionBlock):
        attn = block.attn  # nn.MultiheadAttention
        dim = attn.embed_dim
        w_v = attn.in_proj_weight[2 * dim :] if attn._qkv_same_embed_dim else attn.v_proj_weight
        b_v = attn.in_proj_bias[2 * dim :] if attn.in_proj_bias is not None else None
        v = attn.out_proj(F.linear(block.ln_1(x), w_v, b_v))
        y = x + block.ls_1(v)
    elif isinstance(block, CustomResidualAttentionBlock):
        attn = block.attn  # open_clip.transformer.Attention
        dim = x.shape[-1]
        b_v = attn.in_proj_bias[2 * dim :] if attn.in_proj_bias is not None else None
        v = F.linear(block.ln_1(x), attn.in_proj_weight[2 * dim :], b_v)
        if attn.head_scale is not None:  # per-head scale, applied to the attention output in Attention
            v = (v.unflatten(-1, (attn.num_heads, -1)) * attn.head_scale.view(attn.num_heads, 1)).flatten(-2)
        v = attn.out_drop(attn.out_proj(attn.ln_inner(v)))
        y = x + block.ls_1(block.ln_attn(v))
    else:
        raise NotImplementedError(f"Local features for vision blocks of type {type(block).__name__}")
    return y + block.ls_2(block.mlp(block.ln_2(y)))


def vit_global_and_local(visual: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """(global [B, E], local [B, P, E]) unnormalised features of an open_clip ``VisionTransformer``.

    One pass: embeddings and all blocks but the last as in ``visual.forward``; the last block is run
    normally for the global path (so it equals ``visual(images)`` exactly) and through its value path
    without token mixing for the local path: ``ln_post(v)[:, 1:] @ proj``. With patch dropout active
    (training mode) the local tokens are the kept patches only.
    """
    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(
            f"Local features need open_clip's VisionTransformer tower, got {type(visual).__name__} "
            "(ResNet, timm and other towers are not supported)."
        )
    if visual.attn_pool is not None:
        raise NotImplementedError("Local features for vision towers with attentional pooling (CoCa)")
    if visual.pool_type not in ("tok", "avg"):
        raise NotImplementedError(f"Local features for vision pool_type {visual.pool_type!r}")
    tr = visual.transformer
    x = visual._embeds(images)
    if not tr.batch_first:
        x = x.transpose(0, 1).contiguous()
    use_ckpt = tr.grad_checkpointing and torch.is_grad_enabled()
    for block in tr.resblocks[:-1]:
        x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
    last = tr.resblocks[-1]
    x_global = checkpoint(last, x, use_reentrant=False) if use_ckpt else last(x)
    x_local = _value_path(last, x)
    if not tr.batch_first:
        x_global, x_local = x_global.transpose(0, 1), x_local.transpose(0, 1)
    pooled, _ = visual._pool(x_global)
    local = visual.ln_post(x_local)[:, 1:]
    if visual.proj is not None:
        pooled = pooled @ visual.proj
        local = local @ visual.proj
    return pooled, local


# --------------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------------


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
            ``_shrink_text_context``).
        prefix: key prefix of the model's weights inside a checkpoint file (auto-detected when ``None``).
        weights_only: passed to ``torch.load`` for local files.

    ``forward(images)`` returns unnormalised image embeddings (the ``Backbone`` contract);
    ``encode_image``/``encode_text`` normalise by default.
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
        self.model = self._build(model_name, self.pretrained, context_length, prefix, weights_only)
        self.context_length = _context_length_of(self.model)
        tokenizer_name = model_name if model_name.startswith(_SCHEMAS) else model_name.replace("/", "-")
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

    # ---- construction ----------------------------------------------------------------------------

    @staticmethod
    def _build(
        model_name: str,
        pretrained: str | None,
        context_length: int | None,
        prefix: str | None,
        weights_only: bool,
    ) -> nn.Module:
        if model_name.startswith(_SCHEMAS):
            if pretrained is not None:
                raise ValueError(
                    f"pretrained={pretrained!r} cannot be combined with model_name={model_name!r}: the weights "
                    "come from that folder/repository. Pass pretrained=None."
                )
            model = open_clip.create_model(model_name)
            return CLIPBackbone._fit_context(model, context_length)

        name = model_name.replace("/", "-")
        available = open_clip.list_models()
        if name not in available:
            lowered = {m.lower(): m for m in available}
            close = [lowered[c] for c in difflib.get_close_matches(name.lower(), lowered, n=5, cutoff=0.5)]
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"Unknown open_clip model '{model_name}'.{hint} See open_clip.list_models() for all "
                f"{len(available)} names; 'local-dir:/path' and 'hf-hub:org/repo' are accepted too."
            )
        if pretrained is None:
            kwargs = {} if context_length is None else {"force_context_length": context_length}
            return open_clip.create_model(name, **kwargs)
        if open_clip.get_pretrained_cfg(name, pretrained):
            model = open_clip.create_model(name, pretrained=pretrained)
            return CLIPBackbone._fit_context(model, context_length)
        if os.path.isfile(pretrained):
            root = logging.getLogger()
            quiet = _DropRandomInitWarning()
            root.addFilter(quiet)
            try:
                model = open_clip.create_model(name)
            finally:
                root.removeFilter(quiet)
            used = load_clip_weights(model, pretrained, prefix=prefix, weights_only=weights_only)
            log.info("Loaded %s into %s (key prefix %r)", pretrained, name, used)
            return CLIPBackbone._fit_context(model, context_length)
        tags = open_clip.list_pretrained_tags_by_model(name)
        tag_text = ", ".join(repr(t) for t in tags) if tags else "none (random init or a local file only)"
        raise ValueError(
            f"Unknown pretrained tag '{pretrained}' for open_clip model '{name}' and no such file exists. "
            f"Available tags: {tag_text}. A local weights file path is accepted too."
        )

    @staticmethod
    def _fit_context(model: nn.Module, context_length: int | None) -> nn.Module:
        if context_length is None:
            return model
        native = _context_length_of(model)
        if context_length > native:
            raise ValueError(
                f"context_length={context_length} exceeds the {native} text positions of the loaded weights"
            )
        if context_length < native:
            _shrink_text_context(model, context_length)
        return model

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

    # ---- text side -------------------------------------------------------------------------------

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
        return tuple((p.data_ptr(), p._version) for p in _text_parameters(self.model))

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


# --------------------------------------------------------------------------------------------------
# Prompt learning
# --------------------------------------------------------------------------------------------------


class PromptTextEncoder(nn.Module):
    """Replays an open_clip text tower on token *embeddings* (CoOp's ``TextEncoder`` for open_clip).

    ``forward(prompt_embeddings [N, L, W], eot_indices [N])``: + positional embedding, transformer with
    the causal mask passed explicitly (open_clip's blocks have none built in), ``ln_final``, pooling at
    ``eot_indices``, text projection. Fed ``embed_tokens(tokens)`` it reproduces ``encode_text(tokens)``.
    The model is held by reference, not registered: this module has no parameters of its own.
    """

    def __init__(self, model: nn.Module | CLIPBackbone) -> None:
        super().__init__()
        if isinstance(model, CLIPBackbone):
            model = model.model
        tower = _text_tower(model)
        if getattr(tower, "cls_emb", None) is not None:
            raise NotImplementedError("Prompt learning for text towers with an appended class token (CoCa)")
        if getattr(tower, "use_pad_mask", False):
            raise NotImplementedError("Prompt learning for text towers with a padding mask")
        pool = model.text_pool_type if tower is model else tower.pool_type
        if pool not in ("argmax", "eos", "first", "last"):
            raise NotImplementedError(f"Prompt learning for text pool_type {pool!r}")
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_tower", tower)
        self.pool_type = pool
        self.eos_id = model.text_eos_id if tower is model else tower.eos_id

    @property
    def width(self) -> int:
        return int(self._tower.positional_embedding.shape[1])

    def pool_indices(self, tokens: Tensor) -> Tensor:
        """Index of the token whose feature is pooled (EOT for CLIP's BPE: the largest id)."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        fill = 0 if self.pool_type == "first" else tokens.shape[-1] - 1
        return torch.full(tokens.shape[:1], fill, dtype=torch.long, device=tokens.device)

    def embed_tokens(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(token_embedding(tokens) [N, L, W], eot_indices [N])``."""
        tokens = tokens.to(self._tower.token_embedding.weight.device)
        return self._tower.token_embedding(tokens), self.pool_indices(tokens)

    def forward(self, prompt_embeddings: Tensor, eot_indices: Tensor, normalize: bool = True) -> Tensor:
        tower = self._tower
        n, length, _ = prompt_embeddings.shape
        if length > tower.positional_embedding.shape[0]:
            raise ValueError(
                f"Prompt of {length} tokens exceeds the {tower.positional_embedding.shape[0]} text positions"
            )
        cast = tower.transformer.get_cast_dtype()
        x = prompt_embeddings.to(cast) + tower.positional_embedding[:length].to(cast)
        mask = self._model.attn_mask if tower is self._model else tower.attn_mask
        if mask is not None:
            mask = mask[:length, :length]
        x = tower.transformer(x, attn_mask=mask)
        x = tower.ln_final(x)
        x = x[torch.arange(n, device=x.device), eot_indices.to(x.device)]
        proj = tower.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1) if normalize else x


class PromptLearner(nn.Module):
    """CoOp: learnable context vectors in front of each class name, ``"[SOS] ctx_1..ctx_M {name}.[EOT]"``.

    Args:
        backbone: the ``CLIPBackbone`` (BPE ``SimpleTokenizer`` only). Held by reference; the learner
            never changes its ``requires_grad`` flags: freeze it yourself (``freeze(backbone)``) to
            train the context only.
        class_names: display names, used verbatim (no ``_`` -> space replacement).
        n_ctx: number of context tokens when ``ctx_init`` is None.
        ctx_init: initial context words (e.g. ``"a photo of a"``); then ``n_ctx`` is the number of BPE
            tokens of these words (CoOp behaviour) and ``ctx`` starts at their token embeddings.
        class_specific: one context per class (CoOp "CSC") instead of one shared context.

    Buffers (persistent, so a checkpoint restores them with ``ctx``): ``token_prefix`` ([K, 1, W] SOS
    embedding), ``token_suffix`` ([K, L-1-n_ctx, W] class name, '.', EOT, padding), ``tokenized_prompts``
    and ``eot_indices``. ``forward()`` returns the class text features ``[K, E]``.
    """

    def __init__(
        self,
        backbone: CLIPBackbone,
        class_names: Sequence[str],
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
    ) -> None:
        super().__init__()
        tok = backbone.tokenizer
        if not isinstance(tok, open_clip.SimpleTokenizer):
            raise NotImplementedError(
                f"PromptLearner needs open_clip's BPE SimpleTokenizer, got {type(tok).__name__}"
            )
        class_names = list(class_names)
        if not class_names:
            raise ValueError("PromptLearner needs at least one class name")
        encoder = PromptTextEncoder(backbone.model)
        if ctx_init is not None:
            ctx_text = " ".join(ctx_init.split())
            ctx_ids = tok.encode(ctx_text)
            if not ctx_ids:
                raise ValueError(f"ctx_init={ctx_init!r} has no tokens")
            n_ctx = len(ctx_ids)
        else:
            if n_ctx < 1:
                raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
            ctx_text = " ".join(["X"] * n_ctx)
            ctx_ids = tok.encode(ctx_text)
        tokens = backbone.tokenize([f"{ctx_text} {name}." for name in class_names])
        expected = torch.tensor([tok.sot_token_id, *ctx_ids])
        if len(ctx_ids) != n_ctx or not (tokens[:, : 1 + n_ctx] == expected).all():
            raise NotImplementedError(
                "Tokenizer does not lay prompts out as [SOS] ctx... name; cannot split them"
            )

        embedding, eot = encoder.embed_tokens(tokens)
        embedding = embedding.detach().clone()
        self.register_buffer("tokenized_prompts", tokens.to(eot.device))
        self.register_buffer("eot_indices", eot)
        self.register_buffer("token_prefix", embedding[:, :1])
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :])

        if ctx_init is not None:
            ctx = embedding[0, 1 : 1 + n_ctx].clone()
            if class_specific:
                ctx = ctx.unsqueeze(0).repeat(len(class_names), 1, 1)
        else:
            shape = (len(class_names), n_ctx, encoder.width) if class_specific else (n_ctx, encoder.width)
            ctx = torch.empty(shape, dtype=embedding.dtype, device=embedding.device)
            nn.init.normal_(ctx, std=0.02)
        self.ctx = nn.Parameter(ctx)
        self.encoder = encoder  # no parameters of its own
        self.class_names = class_names
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.class_specific = class_specific

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prompt_embeddings(self) -> Tensor:
        """``[K, L, W]``: prefix | ctx | suffix."""
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.num_classes, -1, -1)
        return torch.cat([self.token_prefix, ctx.to(self.token_prefix.dtype), self.token_suffix], dim=1)

    def forward(self, normalize: bool = True) -> Tensor:
        return self.encoder(self.prompt_embeddings(), self.eot_indices, normalize=normalize)
