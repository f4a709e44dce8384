"""BANG's head temperature (spec section 3, "BANG-scale", our rule).

The fine-tuned head ``(W1, b1)`` is divided by a temperature T before interpolating. ``head_temperature``
is a number, ``nll`` (T minimising the NLL of θ1 on ID validation: temperature scaling) or ``balance``
(T = mean ‖f(x; θ1)‖ / mean ‖f(x; θ0)‖ on ID validation). Only the head is scaled, so for end-to-end
fine-tuning this approximates scaling the fine-tuned model's output.

"The head" is the method's :meth:`~robustft.methods.base.OODMethod.classifier_head` -- the same final
linear layer that ViM / ReAct / ASH read -- located in the state dict by :func:`head_keys`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor

from robustft.methods.base import ConfigMismatchError, OODMethod

__all__ = [
    "TEMPERATURE_RULES",
    "balance_temperature",
    "fit_temperature",
    "head_keys",
    "resolve_temperature",
    "scale_head",
]

TEMPERATURE_RULES = ("nll", "balance")


def head_keys(model: OODMethod) -> tuple[str, ...]:
    """State-dict keys of the tensors :meth:`OODMethod.classifier_head` returns (``("head.weight",
    "head.bias")`` for a classifier): the head BANG scales is the head the scores use."""
    head = model.classifier_head()
    if head is None:
        raise ConfigMismatchError(
            f"head_temperature needs a method with a linear classifier head (classifier_head()), "
            f"{type(model).__name__} has none"
        )
    names = {id(tensor): name for name, tensor in model.state_dict(keep_vars=True).items()}
    keys = tuple(names.get(id(tensor)) for tensor in head if tensor is not None)
    if not keys or None in keys:
        raise ConfigMismatchError(
            f"head_temperature: the classifier head of {type(model).__name__} is not a tensor of its state dict "
            "(classifier_head() must return the head's own parameters)"
        )
    return keys


def scale_head(state: Mapping[str, Tensor], keys: Sequence[str], temperature: float) -> dict[str, Tensor]:
    """A copy of ``state`` whose head tensors are divided by ``temperature`` (T = 1: unchanged copy)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"head temperature must be a finite positive number, got {temperature}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"head keys {missing} not in the state dict")
    out = dict(state)
    if temperature != 1.0:
        for k in keys:
            out[k] = (state[k].double() / temperature).to(state[k].dtype)
    return out


def fit_temperature(logits: Tensor, labels: Tensor, low: float = 0.05, high: float = 20.0, steps: int = 80) -> float:
    """Temperature scaling: the T in [low, high] minimising ``CE(logits / T, labels)`` (golden section on log T)."""
    logits, labels = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels))

    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    return math.exp((a + b) / 2)


def balance_temperature(logits1: Tensor, logits0: Tensor) -> float:
    """BANG's balance: mean logit norm of θ1 over that of θ0 (on the same ID validation images)."""
    return float(logits1.double().norm(dim=1).mean() / logits0.double().norm(dim=1).mean())


def resolve_temperature(
    setting: float | str | None, val_outputs: Callable[[float], Mapping[str, Tensor]] | None
) -> float | None:
    """The head temperature of ``setting``: ``None``, a number, or a rule fitted on ID validation outputs.

    ``val_outputs(α)`` returns the ID-validation outputs (``logits``, ``labels``) of ``θ_α``; ``None``
    when there is no ID validation set (a rule then cannot be fitted)."""
    if setting is None:
        return None
    if not isinstance(setting, str):
        return float(setting)
    if setting not in TEMPERATURE_RULES:
        raise ValueError(f"head_temperature: unknown rule '{setting}'; give a number or one of {', '.join(TEMPERATURE_RULES)}")
    if val_outputs is None:
        raise ConfigMismatchError(
            f"head_temperature: {setting} is chosen on ID validation data; set data.val or data.val_fraction > 0"
        )
    out1 = val_outputs(1.0)
    if setting == "nll":
        return fit_temperature(out1["logits"], out1["labels"])
    out0 = val_outputs(0.0)
    return balance_temperature(out1["logits"], out0["logits"])
