"""Building scores by name, checking a method can feed them, and tuning them on OOD validation sets."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from robustft.ood.scores.base import SCORES, Head, OODScore, _fmt_set, _unknown_hyperparameters

__all__ = ["build_score", "check_score_requirements", "tune_score"]


def build_score(name: str, **hyperparameters: Any) -> OODScore:
    """Instantiate a registered score; unknown names raise ``KeyError`` with close matches, unknown
    hyper-parameters ``TypeError`` naming them and the valid ones.

    ``hyperparameters`` are ``model.score_kwargs[name]``, e.g. ``build_score("knn", k=50,
    feature_key="embedding")`` for KNN on a method's ``embedding`` output."""
    cls = SCORES.get(name)
    valid = cls.hyperparameters()
    if any(k not in valid for k in hyperparameters):
        raise _unknown_hyperparameters(cls, cls.name, hyperparameters)
    return cls(**hyperparameters)


def check_score_requirements(score: OODScore | type[OODScore], available: set[str], has_head: bool) -> None:
    """Raise ``ValueError`` when a method's outputs (``available`` keys, ``has_head``) cannot feed ``score``.

    Pass the built score (not its class) so that a ``feature_key`` is honoured: KNN built with
    ``feature_key="embedding"`` requires ``embedding``."""
    missing = score.requires - set(available)
    if missing:
        hint = ""
        if "feature_key" in score.hyperparameters():
            hint = (
                f", or read another output with model.score_kwargs: {{{score.name}: {{feature_key: <key>}}}}"
            )
        raise ValueError(
            f"score '{score.name}' needs outputs {_fmt_set(score.requires)} but the method provides "
            f"{_fmt_set(available)}; pick another score or a method that exposes {', '.join(sorted(missing))}"
            f"{hint}"
        )
    if score.needs_head and not has_head:
        raise ValueError(
            f"score '{score.name}' needs the classifier head (W, b) but the method has no linear head; "
            "pick another score or a method that exposes its head"
        )


def tune_score(
    name: str,
    id_val: Mapping[str, Tensor],
    ood_val: Mapping[str, Tensor],
    reference: Mapping[str, Tensor] | None,
    head: Head | None,
    metric_fn: Callable[[Tensor, Tensor], float | Tensor],
    *,
    fixed: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], float]:
    """Grid search of a score's ``search_space`` on ID-val vs OOD-*validation* outputs (OpenOOD APS).

    ``metric_fn(id_scores, ood_scores)`` is maximised (AUROC); ties keep the earlier grid point, NaN
    values never win. ``fixed`` hyper-parameters are held constant (e.g. ``{"variant": "ash_p"}`` or
    ``{"feature_key": "embedding"}``; ``feature_key`` is never searched).
    Returns the best hyper-parameters (including ``fixed``, ready for :func:`build_score`) and the
    metric value. A score without a search space is evaluated once with its defaults.
    Never pass test OOD sets here.
    """
    cls = SCORES.get(name)
    fixed = dict(fixed or {})
    if cls.needs_fit and reference is None:
        raise ValueError(f"score '{cls.name}' needs ID training outputs (reference) to be tuned")
    grid = {k: v for k, v in cls.search_grid(reference, head, fixed).items() if k not in fixed}
    keys = list(grid)
    best: dict[str, Any] | None = None
    best_value = -math.inf
    for values in itertools.product(*(grid[k] for k in keys)):
        params = {**fixed, **dict(zip(keys, values, strict=True))}
        score = build_score(name, **params)
        if score.needs_fit or score.needs_head:
            score.fit(reference, head)
        value = float(metric_fn(score(id_val), score(ood_val)))
        if value > best_value:
            best, best_value = params, value
    if best is None:
        raise ValueError(f"metric_fn returned NaN for every setting of score '{cls.name}'")
    return best, best_value
