"""Image backbones by name: CIFAR ResNets, any timm model (``timm/<name>``) and, for CLIP methods,
open_clip models (``robustft.backbones.clip``).

Weights come from a local file (the offline default), never from a hub unless the user asks for it.
Every backbone also returns the features of chosen blocks/stages, ``forward_intermediates(images,
indices)`` (the contract is on :class:`~robustft.backbones.base.Backbone`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from robustft.backbones.base import Backbone, PreprocessConfig
from robustft.backbones.cifar_resnet import CifarResNet
from robustft.backbones.timm_backbone import TimmBackbone
from robustft.registry import Registry
from robustft.state_dicts import NotAStateDictError, load_state_dict_file

BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone")
for _depth in (20, 32, 44, 56, 110):
    BACKBONES.register(f"cifar_resnet{_depth}")(lambda depth=_depth, **kw: CifarResNet(depth=depth, **kw))


class WeightsError(ValueError):
    """A weights file cannot be used for this backbone; the message names the file and the keys."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict (plain, ``{'state_dict': ...}`` wrapped or a Lightning checkpoint; DataParallel's
    ``module.`` prefix stripped) with :func:`robustft.state_dicts.load_state_dict_file`, reporting
    problems as :class:`WeightsError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist; give the path of a .pt/.pth/.th/.ckpt file")
    try:
        return load_state_dict_file(path)
    except NotAStateDictError as exc:
        raise WeightsError(f"'{path}' holds no state dict (a mapping of parameter names to tensors): {exc}") from exc
    except ValueError as exc:
        raise WeightsError(f"cannot read weights file '{path}': {exc}") from exc


def split_head(state: dict[str, torch.Tensor], backbone: Backbone) -> tuple[dict, dict]:
    """Split a checkpoint into (backbone keys, classifier-head keys ``weight``/``bias``).

    Accepts the architecture's own checkpoints (e.g. akamaster's ``linear.*``, timm's ``fc.*``) and
    robustft classifier checkpoints (``backbone.*`` / ``head.*``).
    """
    if any(k.startswith("backbone.") for k in state):
        body = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
        return body, head
    head_prefix = getattr(backbone, "head_prefix", "fc.")
    key_prefix = "model." if isinstance(backbone, TimmBackbone) else ""
    file_head_prefix = head_prefix.removeprefix(key_prefix)
    body = {key_prefix + k: v for k, v in state.items() if not k.startswith(file_head_prefix)}
    head = {k.removeprefix(file_head_prefix): v for k, v in state.items() if k.startswith(file_head_prefix)}
    return body, head


def load_backbone_weights(backbone: Backbone, path: str | Path) -> dict[str, torch.Tensor]:
    """Load a weights file into ``backbone`` strictly; return the classifier-head tensors it held."""
    body, head = split_head(read_state_dict(path), backbone)
    expected = backbone.state_dict()
    # BatchNorm's num_batches_tracked is absent from checkpoints written before torch 0.4.1; it only
    # matters for momentum=None, so the model's own counter is kept.
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in body:
            body[key] = expected[key]
    missing = [k for k in expected if k not in body]
    unexpected = [k for k in body if k not in expected]
    wrong_shape = [
        f"{k}: file {tuple(body[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in body and body[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong_shape:
        problems.append(f"shape mismatch {wrong_shape[:5]}")
    if problems:
        raise WeightsError(
            f"weights file '{path}' does not fit backbone {type(backbone).__name__}: {'; '.join(problems)}. "
            "Was it written for another architecture or depth?"
        )
    backbone.load_state_dict(body, strict=True)
    return head


def create_backbone(name: str, weights: str | None = None, **kwargs) -> Backbone:
    """Build a backbone by registered name or ``timm/<timm model name>``; optionally load local weights.

    ``weights`` is a local file path. For timm models ``weights='timm-pretrained'`` asks timm for its
    default pretrained weights (online users only). ``clip:<open_clip model name>`` is a CLIP image
    tower (:class:`~robustft.backbones.clip_image.CLIPImageBackbone`); ``weights`` is then an open_clip
    pretrained tag or a local open_clip weights file.
    """
    if name.startswith("clip:"):  # CLIP image tower; weights = open_clip tag or local file
        from robustft.backbones.clip_image import CLIPImageBackbone

        return CLIPImageBackbone(name.removeprefix("clip:"), weights, **kwargs)
    if name.startswith("timm/"):
        backbone: Backbone = TimmBackbone(name.removeprefix("timm/"), pretrained=weights == "timm-pretrained", **kwargs)
        if weights == "timm-pretrained":
            return backbone
    else:
        backbone = BACKBONES.get(name)(**kwargs)
    if weights is not None:
        try:
            backbone.pretrained_head = load_backbone_weights(backbone, weights)
        except WeightsError as exc:  # name the config field: the same file may be read for other purposes
            raise WeightsError(f"model.init_args.backbone_weights: {exc}") from None
    return backbone


__all__ = [
    "BACKBONES",
    "Backbone",
    "CifarResNet",
    "PreprocessConfig",
    "TimmBackbone",
    "WeightsError",
    "create_backbone",
    "load_backbone_weights",
    "read_state_dict",
]
