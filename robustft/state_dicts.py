"""Reading state dicts from files, the one place that knows checkpoint layouts.

Used by weight averaging (WiSE-FT, BANG, soups) and by backbones that load local weights: a plain state
dict, a ``{'state_dict': ...}`` wrapper, a Lightning checkpoint, or a pickled module (trusted files only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

MAX_LISTED = 10
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class NotAStateDictError(ValueError):
    """The file was read but holds no mapping of parameter names to tensors."""


def listed(items: Sequence[str]) -> str:
    """Show at most ``MAX_LISTED`` items so an error for a whole wrong model stays readable."""
    shown = ", ".join(items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return shown + (f", ... (+{more} more)" if more > 0 else "")


def _strip_wrapper_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Remove DataParallel/DDP ``module.`` and ``torch.compile`` ``_orig_mod.`` prefixes (nested too)."""
    out = dict(sd)
    changed = True
    while changed and out:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def _select_prefix(sd: Mapping[str, Any], prefix: str, path: Path) -> dict[str, Any]:
    """Keep the entries under ``prefix`` (e.g. a LightningModule's ``model.``) with it removed."""
    out = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(
            f"{path}: no key starts with prefix {prefix!r}; first keys are {listed(list(sd)[:MAX_LISTED])}. "
            "Fix: pass the attribute name under which the network is stored in the LightningModule, or "
            "prefix=None."
        )
    return out


def _unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    """Find the state dict in a plain dict, a ``{'state_dict': ...}`` wrapper or a Lightning checkpoint."""
    if isinstance(obj, nn.Module):  # whole pickled module (e.g. mlfoundations/wise-ft checkpoints)
        return obj.state_dict()
    if isinstance(obj, Mapping):
        inner = obj.get("state_dict")
        if isinstance(inner, Mapping):  # covers Lightning checkpoints, which also hold optimizer state etc.
            return inner
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return obj
        found = f"a dict with keys {listed([str(k) for k in obj])}"
    else:
        found = f"an object of type {type(obj).__name__}"
    raise NotAStateDictError(
        f"{path}: expected a state dict, a {{'state_dict': ...}} wrapper or a Lightning checkpoint, found "
        f"{found}. Fix: save the network with torch.save(model.state_dict(), path)."
    )


def load_state_dict_file(
    path: str | Path, *, prefix: str | None = None, weights_only: bool = True
) -> dict[str, Tensor]:
    """Load a checkpoint file as a flat state dict on CPU, ready for averaging.

    Accepts a plain state dict, a ``{'state_dict': ...}`` wrapper, a Lightning checkpoint and a pickled
    ``nn.Module`` (the last needs ``weights_only=False``). Leading ``module.`` (DataParallel/DDP) and
    ``_orig_mod.`` (``torch.compile``) prefixes shared by all keys are stripped. ``prefix`` additionally
    keeps only the keys under a LightningModule attribute, e.g. ``prefix="model."``; it is not stripped
    automatically because a network may legitimately have a submodule called ``model``.

    ``weights_only=True`` (default) refuses to unpickle arbitrary objects; set it to ``False`` only for
    files you trust, e.g. Lightning checkpoints whose hyper-parameters hold custom classes.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}. Fix: check the path (cwd is {Path.cwd()}).")
    if path.is_dir():
        raise ValueError(f"{path} is a directory. Fix: pass the checkpoint file inside it (.pt/.pth/.ckpt).")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... depending on damage
        hint = (
            " If the file is trusted and holds non-tensor objects (e.g. Lightning hyper-parameters or a "
            "pickled module), retry with weights_only=False."
            if weights_only
            else ""
        )
        raise ValueError(
            f"cannot read {path} with torch.load ({type(err).__name__}: {err}). Fix: make sure it is a "
            f"complete file written by torch.save (not truncated or a different format).{hint}"
        ) from err
    sd = _strip_wrapper_prefixes(_unwrap(obj, path))
    if prefix is not None:
        sd = _strip_wrapper_prefixes(_select_prefix(sd, prefix, path))
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise NotAStateDictError(f"{path}: state dict has non-tensor entries: {listed(bad)}")
    if not sd:
        raise ValueError(f"{path}: the state dict is empty")
    return dict(sd)
