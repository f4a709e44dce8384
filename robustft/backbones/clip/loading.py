"""Building open_clip models: tiny configs, names, pretrained tags, local weight files, context length.

* :func:`register_clip_configs` registers the tiny architectures of ``robustft/assets/clip_configs``
  (``robustft-micro-vit``, ``robustft-tiny-vit``) with open_clip; it runs when this module is imported.
* :func:`load_clip_weights` loads an open_clip state dict or a Lightning checkpoint holding one (key
  prefix detected), reporting missing/unexpected keys and shape mismatches by name.
* :func:`build_open_clip_model` resolves a model name (``ViT-B-16``, ``local-dir:``, ``hf-hub:``) and a
  ``pretrained`` tag or file, with errors that list close names or the available tags.
"""

from __future__ import annotations

import difflib
import logging
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor, nn

from robustft.backbones.clip.text import shrink_text_context, text_context_length

__all__ = [
    "CLIP_CONFIG_DIR",
    "SCHEMAS",
    "build_open_clip_model",
    "fit_text_context",
    "load_clip_weights",
    "register_clip_configs",
]

log = logging.getLogger(__name__)

CLIP_CONFIG_DIR = Path(__file__).resolve().parents[2] / "assets" / "clip_configs"
#: model-name schemas whose weights come with the name (``pretrained`` must then be ``None``)
SCHEMAS = ("local-dir:", "hf-hub:")


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
# Weight loading
# --------------------------------------------------------------------------------------------------


def _first(items: Sequence[Any], n: int = 5) -> str:
    shown = ", ".join(str(i) for i in list(items)[:n])
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return shown + more


class _DropRandomInitWarning(logging.Filter):
    """Hide open_clip's 'initialized randomly' warning while we load the weights ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


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


# --------------------------------------------------------------------------------------------------
# Building a model by name / tag / file
# --------------------------------------------------------------------------------------------------


def fit_text_context(model: nn.Module, context_length: int | None) -> nn.Module:
    """Shrink the text context of a loaded model to ``context_length`` (``None``: keep it); never grow it."""
    if context_length is None:
        return model
    native = text_context_length(model)
    if context_length > native:
        raise ValueError(
            f"context_length={context_length} exceeds the {native} text positions of the loaded weights"
        )
    if context_length < native:
        shrink_text_context(model, context_length)
    return model


def build_open_clip_model(
    model_name: str,
    pretrained: str | None = None,
    context_length: int | None = None,
    prefix: str | None = None,
    weights_only: bool = True,
) -> nn.Module:
    """An open_clip model by name, with weights from a tag, a local file or nothing (random init).

    See :class:`~robustft.backbones.clip.CLIPBackbone` for the meaning of the arguments.
    """
    if model_name.startswith(SCHEMAS):
        if pretrained is not None:
            raise ValueError(
                f"pretrained={pretrained!r} cannot be combined with model_name={model_name!r}: the weights "
                "come from that folder/repository. Pass pretrained=None."
            )
        model = open_clip.create_model(model_name)
        return fit_text_context(model, context_length)

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
        return fit_text_context(model, context_length)
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
        return fit_text_context(model, context_length)
    tags = open_clip.list_pretrained_tags_by_model(name)
    tag_text = ", ".join(repr(t) for t in tags) if tags else "none (random init or a local file only)"
    raise ValueError(
        f"Unknown pretrained tag '{pretrained}' for open_clip model '{name}' and no such file exists. "
        f"Available tags: {tag_text}. A local weights file path is accepted too."
    )
