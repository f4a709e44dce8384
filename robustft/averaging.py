"""Weight-space averaging shared by WiSE-FT, BANG and model soups.

All three methods build one network whose weights are a weighted average of several checkpoints that
share an initialisation: WiSE-FT and BANG interpolate a zero-shot model θ0 and a fine-tuned model θ1,
model soups average many fine-tuned ingredients. Keeping a single implementation means the key/shape
checks, the handling of integer buffers and the numerics are the same for every method.

Decisions (spec: ``methods-robust-finetuning.md`` section 0):

* **Floating-point tensors** are averaged in float64 (float32 on devices without float64, i.e. MPS) and
  cast back to their stored dtype, so fp16/bf16 checkpoints are not averaged in low precision and a
  soup of identical checkpoints returns the checkpoint bit-for-bit.
* **Endpoints are exact.** When one weight is exactly 1 and the others 0 (``alpha`` 0 or 1, a soup of
  one ingredient) the result is a copy of that input, bit-for-bit (including ``-0.0`` and NaN payloads),
  rather than ``1*a + 0*b``, which can flip the sign of zeros and turns ``inf`` in the other input into
  NaN.
* **Non-floating tensors** (integer position ids, boolean masks, BatchNorm ``num_batches_tracked``) are
  never averaged: an averaged counter would be a float that is truncated again on load, and averaged ids
  or masks are meaningless. They must be equal in all inputs, with one exception: BatchNorm
  ``num_batches_tracked`` counters legitimately differ between a pre-trained and a fine-tuned model, and
  are copied from the *reference* input, which is the input with weight 1 at an endpoint and otherwise
  the first input (θ0 for interpolation, the first/best ingredient for soups). So ``alpha == 1`` yields
  θ1's counter and every other ``alpha`` yields θ0's.
* Inputs must have identical key sets, shapes and dtypes; otherwise :class:`StateDictMismatchError`
  lists what differs. Wrapper prefixes are stripped when loading (:func:`load_state_dict_file`), not
  silently while averaging.

BatchNorm caveat: averaged running statistics are not the statistics of the averaged network; for BN
models re-estimate them on a few training batches after averaging.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from robustft.state_dicts import listed as _listed
from robustft.state_dicts import load_state_dict_file

__all__ = [
    "GreedySoupResult",
    "StateDictMismatchError",
    "greedy_soup",
    "interpolate_state_dicts",
    "load_state_dict_file",
    "uniform_soup",
    "weighted_average",
]

StateDict = Mapping[str, Tensor]

_COUNTER_SUFFIX = "num_batches_tracked"
_WEIGHT_SUM_TOL = 1e-6


class StateDictMismatchError(ValueError):
    """The state dicts cannot be averaged: keys, shapes, dtypes or integer buffers differ."""


# --------------------------------------------------------------------------------------------------
# checks


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _pair_problems(ref: StateDict, other: StateDict, ref_name: str, other_name: str) -> list[str]:
    """Describe every way ``other`` differs from ``ref`` that makes averaging them ill-defined."""
    problems: list[str] = []
    missing = [k for k in ref if k not in other]
    unexpected = [k for k in other if k not in ref]
    if missing:
        problems.append(f"{len(missing)} key(s) of {ref_name} missing from {other_name}: {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) in {other_name}: {_listed(unexpected)}")
    common = [k for k in ref if k in other]
    shapes = [
        f"{k}: {_shape(ref[k])} vs {_shape(other[k])}" for k in common if ref[k].shape != other[k].shape
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es) ({ref_name} vs {other_name}): {_listed(shapes)}")
    dtypes = [f"{k}: {ref[k].dtype} vs {other[k].dtype}" for k in common if ref[k].dtype != other[k].dtype]
    if dtypes:
        problems.append(f"{len(dtypes)} dtype mismatch(es) ({ref_name} vs {other_name}): {_listed(dtypes)}")
    values = [
        k
        for k in common
        if _must_be_equal(k, ref[k])
        and ref[k].shape == other[k].shape
        and ref[k].dtype == other[k].dtype
        and not torch.equal(ref[k], other[k].to(ref[k].device))
    ]
    if values:
        problems.append(
            f"{len(values)} non-floating tensor(s) differ between {ref_name} and {other_name} "
            f"(integer/bool buffers are copied, not averaged, so they must be equal): {_listed(values)}"
        )
    return problems


def _must_be_equal(key: str, tensor: Tensor) -> bool:
    """Non-floating tensors must agree across inputs, except BatchNorm step counters."""
    return not tensor.is_floating_point() and not key.endswith(_COUNTER_SUFFIX)


def _check_compatible(state_dicts: Sequence[StateDict], names: Sequence[str]) -> None:
    """Raise :class:`StateDictMismatchError` unless all inputs match the first one."""
    if not state_dicts:
        raise ValueError("need at least one state dict to average, got none")
    for i, sd in enumerate(state_dicts):
        if not isinstance(sd, Mapping):
            raise TypeError(f"{names[i]} is a {type(sd).__name__}, expected a state dict (str -> Tensor)")
        bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
        if bad:
            raise TypeError(f"{names[i]} has non-tensor values for key(s): {_listed(bad)}")
    problems: list[str] = []
    for name, sd in zip(names[1:], state_dicts[1:], strict=True):
        problems += _pair_problems(state_dicts[0], sd, names[0], name)
    if problems:
        raise StateDictMismatchError(
            "state dicts cannot be averaged:\n  - "
            + "\n  - ".join(problems)
            + "\nFix: average only checkpoints of the same architecture and dtype that were fine-tuned "
            "from the same initialisation; if keys differ only by a 'module.'/'_orig_mod.' or Lightning "
            "attribute prefix, load them with robustft.averaging.load_state_dict_file(path, prefix=...)."
        )


def _check_weights(weights: Sequence[float], n: int, allow_extrapolation: bool) -> list[float]:
    """Weights must be finite, sum to 1 and, unless extrapolating, be non-negative (convex)."""
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"got {len(w)} weights for {n} state dicts")
    if not all(math.isfinite(x) for x in w):
        raise ValueError(f"weights must be finite, got {w}")
    if abs(math.fsum(w) - 1.0) > _WEIGHT_SUM_TOL:
        raise ValueError(f"weights must sum to 1 (an affine combination), got sum {math.fsum(w)!r}")
    if not allow_extrapolation and any(x < 0 for x in w):
        raise ValueError(
            f"negative weight in {w}: this extrapolates beyond the inputs; pass allow_extrapolation=True "
            "if that is intended"
        )
    return w


# --------------------------------------------------------------------------------------------------
# averaging


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 where available, so rounding happens once (at the final cast) for float32/16 inputs."""
    return torch.float32 if device.type == "mps" else torch.float64


def _combine(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Weighted sum of one entry; non-floating entries are copied from the first (reference) input."""
    ref = tensors[0]
    if not ref.is_floating_point():
        return ref.detach().clone()
    acc_dtype = _accumulation_dtype(ref.device)
    acc = torch.zeros(ref.shape, dtype=acc_dtype, device=ref.device)
    for t, w in zip(tensors, weights, strict=True):
        if w != 0.0:
            acc.add_(t.detach().to(device=ref.device, dtype=acc_dtype), alpha=w)
    return acc.to(ref.dtype)


def _copy(sd: StateDict) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}


def _endpoint_index(weights: Sequence[float]) -> int | None:
    """Index of the only non-zero weight if it is exactly 1: the average is then that input itself."""
    nonzero = [i for i, x in enumerate(weights) if x != 0.0]
    return nonzero[0] if len(nonzero) == 1 and weights[nonzero[0]] == 1.0 else None


def weighted_average(
    state_dicts: Sequence[StateDict],
    weights: Sequence[float],
    *,
    allow_extrapolation: bool = False,
    names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Return ``Σ_m w_m θ_m`` for floating tensors; the primitive behind interpolation and soups.

    Args:
        state_dicts: inputs with identical keys, shapes and dtypes (checked).
        weights: one weight per input, summing to 1; negative weights need ``allow_extrapolation``.
        allow_extrapolation: permit weights outside [0, 1] (e.g. WiSE-FT with ``alpha > 1``).
        names: how inputs are called in error messages (default ``input 0``, ``input 1``, ...).

    Returns:
        A new state dict (tensors never alias the inputs) in the key order of the first input, on the
        first input's devices. If one weight is exactly 1 (the rest 0) it is a bit-exact copy of that
        input; non-floating tensors come from that input, or else from the first input.
    """
    names = list(names) if names is not None else [f"input {i}" for i in range(len(state_dicts))]
    _check_compatible(state_dicts, names)
    w = _check_weights(weights, len(state_dicts), allow_extrapolation)
    endpoint = _endpoint_index(w)
    if endpoint is not None:
        return _copy(state_dicts[endpoint])
    return {k: _combine([sd[k] for sd in state_dicts], w) for k in state_dicts[0]}


def interpolate_state_dicts(
    theta0: StateDict, theta1: StateDict, alpha: float, *, allow_extrapolation: bool = False
) -> dict[str, Tensor]:
    """WiSE-FT / BANG weight-space ensemble ``(1 - alpha) * theta0 + alpha * theta1``.

    ``alpha = 0`` returns a bit-exact copy of ``theta0`` and ``alpha = 1`` of ``theta1``, so the
    endpoints of an α-sweep reproduce the zero-shot and fine-tuned models exactly. Integer buffers
    must match, except BatchNorm ``num_batches_tracked``, which is taken from ``theta1`` when
    ``alpha == 1`` and from ``theta0`` otherwise. ``alpha`` outside [0, 1] raises unless
    ``allow_extrapolation=True``.
    """
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if not allow_extrapolation and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} is outside [0, 1]; pass allow_extrapolation=True to extrapolate")
    return weighted_average(
        [theta0, theta1],
        [1.0 - alpha, alpha],
        allow_extrapolation=allow_extrapolation,
        names=["theta0", "theta1"],
    )


def uniform_soup(state_dicts: Sequence[StateDict]) -> dict[str, Tensor]:
    """Uniform model soup: the plain mean of all ingredients (non-floating tensors from the first)."""
    n = len(state_dicts)
    if n == 0:
        raise ValueError("uniform_soup needs at least one ingredient, got none")
    return weighted_average(state_dicts, [1.0 / n] * n, names=[f"ingredient {i}" for i in range(n)])


# --------------------------------------------------------------------------------------------------
# greedy soup


@dataclass(frozen=True)
class GreedySoupResult:
    """Outcome of :func:`greedy_soup`.

    Attributes:
        state_dict: the uniform average of the selected ingredients.
        selected_indices: indices into the ingredient list, in the order they were added (best first).
        scores: each ingredient's own held-out score, indexed like the ingredient list.
        soup_score: held-out score of ``state_dict``; never below ``max(scores)``.
    """

    state_dict: dict[str, Tensor]
    selected_indices: tuple[int, ...]
    scores: tuple[float, ...]
    soup_score: float


def _score(evaluate: Callable[[dict[str, Tensor]], float], sd: dict[str, Tensor], what: str) -> float:
    """Evaluate and reject NaN, which would make every later comparison silently false."""
    value = float(evaluate(sd))
    if math.isnan(value):
        raise ValueError(f"evaluate returned NaN for {what}; greedy soup needs a comparable score")
    return value


def greedy_soup(
    ingredients: Sequence[StateDict],
    evaluate: Callable[[dict[str, Tensor]], float],
    *,
    accept_ties: bool = True,
) -> GreedySoupResult:
    """Greedy model soup (Wortsman et al., 2022).

    Ingredients are ranked by their own held-out score (higher is better; ties keep list order). The
    soup starts as the best ingredient; each next ingredient is kept only if the uniform average of the
    kept set plus it scores at least as well as the current soup (``accept_ties=True``, the paper's
    Algorithm 1) or strictly better (``accept_ties=False``, as in the official ``main.py``). Because a
    candidate replaces the soup only when it does not lower the score, the result never scores below
    the best single ingredient on the held-out data used by ``evaluate``.

    ``evaluate`` must be deterministic and use held-out data (not the test set): it is called once per
    ingredient and once per candidate soup. Ingredients should share an initialisation; with a small or
    heterogeneous pool the soup often keeps only the best model.
    """
    if not ingredients:
        raise ValueError("greedy_soup needs at least one ingredient, got none")
    names = [f"ingredient {i}" for i in range(len(ingredients))]
    _check_compatible(ingredients, names)
    scores = tuple(_score(evaluate, _copy(sd), names[i]) for i, sd in enumerate(ingredients))
    order = sorted(range(len(ingredients)), key=lambda i: -scores[i])
    selected = [order[0]]
    soup = _copy(ingredients[order[0]])
    best = scores[order[0]]
    for i in order[1:]:
        candidate = uniform_soup([ingredients[j] for j in [*selected, i]])
        value = _score(evaluate, candidate, f"the soup of ingredients {[*selected, i]}")
        if value > best or (accept_ties and value == best):
            selected.append(i)
            soup, best = candidate, value
    return GreedySoupResult(state_dict=soup, selected_indices=tuple(selected), scores=scores, soup_score=best)


# --------------------------------------------------------------------------------------------------
# loading


