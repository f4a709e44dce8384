"""OOD detection metrics that reproduce OpenOOD v1.5 / scikit-learn numbers exactly, in torch.

Why not sklearn? OpenOOD computes five numbers per (OOD set, score) with five separate sklearn calls,
each of which re-sorts the scores and re-validates the labels. On 10^6 gathered scores that is about a
second per row, on the CPU only. Here one sort of the pooled scores feeds every metric: the cumulative
ID / OOD counts at each distinct threshold are all that ROC and PR curves need, and the OOD-positive
curve (OpenOOD's convention) is the same counts read from the other end. Everything runs on the
device of the input (CPU or CUDA) in float64, and the counts are exact integers, so the results agree
with sklearn to rounding (~1e-15).

Conventions
-----------
* Scores: **higher = more in-distribution** (the postprocessor contract, as in OpenOOD).
* ``auroc``: ``sklearn.metrics.roc_auc_score(is_id, score)``; ties count half. The value is the same
  with OOD as positive class and negated scores (OpenOOD's way), so there is one AUROC.
* ``aupr_in``: ID positive, ``auc(recall, precision)`` over ``precision_recall_curve(is_id, score)``
  (trapezoid, as OpenOOD does; *not* sklearn's step-wise average precision).
* ``aupr_out``: same with OOD positive and ``-score``.
* ``fpr95``: the ODIN / Hendrycks convention used by most papers: fraction of OOD samples accepted as
  ID at the threshold keeping 95 % of ID samples, i.e. ``fpr[argmax(tpr >= 0.95)]`` of
  ``roc_curve(is_id, score, drop_intermediate=False)``.
* ``fpr95_openood``: OpenOOD v1.5's reversed convention: fraction of ID samples flagged OOD at the
  first threshold that detects 95 % of OOD samples, ``fpr[argmax(tpr >= 0.95)]`` of
  ``roc_curve(is_ood, -score)`` with sklearn's default ``drop_intermediate=True`` (what OpenOOD
  calls). Dropping collinear ROC points *can* move that point when a threshold value is shared by
  ID and OOD samples in a run of equal steps (tied integer scores), so the drop is reproduced here to
  match OpenOOD bit for bit rather than approximately.

Precision-recall curve details (scikit-learn 1.9): one point per distinct score, precision
``tps / (tps + fps)``, plus the final ``(recall 0, precision 1)`` point. Older versions also
cut the curve once full recall was reached; the cut points all have recall 1, so they add zero width
to the trapezoid and the AUPR is the same with either version.

Degenerate inputs: all scores equal gives ``auroc = 0.5``, ``fpr95 = fpr95_openood = 1.0``,
``aupr_in = (1 + n_id / n) / 2`` and ``aupr_out = (1 + n_ood / n) / 2`` (the PR "curve" is the
segment from (0, 1) to (1, base rate)), exactly what sklearn / OpenOOD report. Empty sets,
non-finite scores and non-1-D inputs raise ``ValueError`` rather than silently returning NaN;
complex, boolean and non-numeric scores raise ``TypeError`` rather than being cast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["METRIC_KEYS", "TPR_LEVEL", "ScoreArray", "ood_metrics", "roc_curve_points"]

METRIC_KEYS: tuple[str, ...] = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood")
"""Keys of :func:`ood_metrics`, in report column order."""

TPR_LEVEL = 0.95
"""True-positive rate at which both FPR@95 variants are read off the ROC curve."""

ScoreArray = Tensor | np.ndarray


@dataclass(frozen=True)
class _Curve:
    """Cumulative confusion counts at each distinct threshold, thresholds in decreasing order.

    ``tps[k]`` / ``fps[k]`` count positives / negatives predicted positive at threshold ``k`` (the
    k-th largest distinct score of the positive-class-oriented score). Counts are float64 integers,
    exact up to 2**53 samples, so every metric below is a single rounding away from the true value.
    """

    tps: Tensor
    fps: Tensor
    n_pos: int
    n_neg: int


def _pick_device(*arrays: object) -> torch.device:
    """Compute where the caller's data already lives: the first tensor's device, else the CPU."""
    for arr in arrays:
        if isinstance(arr, Tensor):
            return arr.device
    return torch.device("cpu")


_NOT_REAL = {  # by numpy dtype kind
    # casting to float64 would silently drop the imaginary part
    "c": "{name} has complex dtype {dtype}; the score function must return real values "
    "(higher = more ID), e.g. take .real or .abs() inside it",
    # a thresholded decision, not a score: the curves would have a single threshold
    "b": "{name} has dtype {dtype}; the score function must return real values (higher = more ID), "
    "not thresholded decisions",
    "other": "{name} has non-numeric dtype {dtype}; the score function must return real values "
    "(higher = more ID)",
}


def _as_scores(scores: ScoreArray, name: str, device: torch.device) -> Tensor:
    """Validate one score set and return it as a float64 tensor on ``device``.

    Float64 because float32 cumulative sums lose integer exactness past 2**24 samples, and
    float32 -> float64 is exact and order preserving, so ties are neither created nor broken.
    Complex, boolean and non-numeric scores are refused: the cast would drop an imaginary part or
    hide a score function that returns decisions instead of scores.
    """
    if isinstance(scores, Tensor):
        dtype = scores.dtype
        kind = "c" if scores.is_complex() else "b" if dtype == torch.bool else "f"  # numpy's dtype.kind
    else:
        scores = np.asarray(scores)
        dtype, kind = scores.dtype, scores.dtype.kind
    if kind not in "iuf":
        raise TypeError(_NOT_REAL.get(kind, _NOT_REAL["other"]).format(name=name, dtype=dtype))
    tensor = scores.detach() if isinstance(scores, Tensor) else torch.as_tensor(scores)
    if tensor.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D (one score per sample), got shape {tuple(tensor.shape)}; "
            "flatten or select the score column first"
        )
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty: metrics need at least one sample in both the ID and the OOD set")
    tensor = tensor.to(device=device, dtype=torch.float64)
    n_bad = int((~torch.isfinite(tensor)).sum().item())
    if n_bad:
        raise ValueError(
            f"{name} contains {n_bad} non-finite value(s) (NaN or +/-inf) out of {tensor.numel()}; "
            "the score function overflowed or divided by zero, fix it rather than the metric"
        )
    return tensor


def _prepare(id_scores: ScoreArray, ood_scores: ScoreArray) -> tuple[Tensor, Tensor]:
    """Validate both sets and put them on one device (the first tensor's)."""
    device = _pick_device(id_scores, ood_scores)
    return _as_scores(id_scores, "id_scores", device), _as_scores(ood_scores, "ood_scores", device)


def _id_positive_curve(id_scores: Tensor, ood_scores: Tensor) -> _Curve:
    """Counts of ID (tps) and OOD (fps) with score >= each distinct score, thresholds decreasing.

    On the CPU numpy's vectorised value sort (:func:`_id_positive_curve_merge`) is several times faster
    than ``torch.sort`` with indices; on an accelerator the scores stay where they are
    (:func:`_id_positive_curve_sort`). Both give identical integer counts."""
    if id_scores.device.type == "cpu":
        return _id_positive_curve_merge(id_scores, ood_scores)
    return _id_positive_curve_sort(id_scores, ood_scores)


def _id_positive_curve_merge(id_scores: Tensor, ood_scores: Tensor) -> _Curve:
    """CPU: sort each set by value alone, then merge the two sorted runs with labels.

    A value-only sort is the cheapest sort there is (numpy's is SIMD-vectorised); a stable argsort of the
    two concatenated sorted runs is timsort finding two runs and merging them once, i.e. linear. The
    merged order's labels are ``position < n_id``; the IDs strictly below each distinct value are a
    cumulative count read at the value's first position, so the order *within* a run of ties (which a
    merge leaves arbitrary between ID and OOD) never matters.
    """
    tps, fps = _curve_counts_numpy(id_scores.numpy(), ood_scores.numpy())
    return _Curve(tps=torch.from_numpy(tps), fps=torch.from_numpy(fps), n_pos=id_scores.numel(), n_neg=ood_scores.numel())


def _curve_counts_numpy(ids: np.ndarray, oods: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(tps, fps)`` of :func:`_id_positive_curve_merge` as float64 numpy arrays."""
    n_id = len(ids)
    n = n_id + len(oods)
    two_runs = np.concatenate([np.sort(ids), np.sort(oods)])
    order = np.argsort(two_runs, kind="stable")
    merged = two_runs[order]
    is_id = order < n_id
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(merged[1:], merged[:-1], out=first[1:])
    starts = np.flatnonzero(first)  # ascending: first position of each distinct value
    id_below = np.cumsum(is_id)[starts] - is_id[starts]  # IDs strictly below each distinct value
    tps = (n_id - id_below)[::-1].astype(np.float64)  # decreasing thresholds: ID with score >= value
    fps = (n - starts)[::-1].astype(np.float64)
    fps -= tps
    return tps, fps


def _id_positive_curve_sort(id_scores: Tensor, ood_scores: Tensor) -> _Curve:
    """The one sort (any device): counts of ID (tps) and OOD (fps) with score >= each distinct score.

    ID samples come first in the pooled vector, so a sorted position's label is just
    ``index < n_id``: no gather of a label tensor needed.
    """
    n_id, n_ood = id_scores.numel(), ood_scores.numel()
    sorted_scores, order = torch.sort(torch.cat([id_scores, ood_scores]), descending=True)
    is_id = order < n_id
    # Last position of each run of equal scores = one threshold per distinct value.
    run_end = torch.ne(sorted_scores[1:], sorted_scores[:-1]).nonzero().squeeze(1)
    last = torch.tensor([sorted_scores.numel() - 1], device=run_end.device, dtype=run_end.dtype)
    run_end = torch.cat([run_end, last])
    tps = torch.cumsum(is_id, dim=0)[run_end].to(torch.float64)
    fps = (run_end + 1).to(torch.float64) - tps
    return _Curve(tps=tps, fps=fps, n_pos=n_id, n_neg=n_ood)


def _flip_curve(curve: _Curve) -> _Curve:
    """The same thresholds seen with the other class positive and the score negated.

    With ``-score`` the thresholds run in increasing order of the original score, and the samples
    predicted positive at the original threshold ``k`` are those *not* above the previous threshold
    ``k - 1``. So the new counts are ``total - previous count``, reversed; no second sort.
    """
    zero = curve.tps.new_zeros(1)
    prev_tps = torch.cat([zero, curve.tps[:-1]])
    prev_fps = torch.cat([zero, curve.fps[:-1]])
    return _Curve(
        tps=torch.flip(curve.n_neg - prev_fps, dims=[0]),
        fps=torch.flip(curve.n_pos - prev_tps, dims=[0]),
        n_pos=curve.n_neg,
        n_neg=curve.n_pos,
    )


def _with_origin(values: Tensor, origin: float) -> Tensor:
    """Prepend the curve's start point (0 for ROC counts / recall, 1 for PR precision)."""
    return torch.cat([values.new_full((1,), origin), values])


def _auroc(curve: _Curve) -> Tensor:
    """Trapezoid area under the ROC curve from integer counts.

    Every trapezoid term ``dfps * (tps_k + tps_{k-1})`` is an integer, so the sum is exact and the
    single division at the end is the only rounding; a tie between an ID and an OOD sample is a
    diagonal segment, i.e. half credit, as in ``roc_auc_score``.
    """
    tps = _with_origin(curve.tps, 0.0)
    fps = _with_origin(curve.fps, 0.0)
    twice_area = torch.sum(torch.diff(fps) * (tps[1:] + tps[:-1]))
    return twice_area / (2.0 * curve.n_pos * curve.n_neg)


def _aupr(curve: _Curve) -> Tensor:
    """Trapezoid area under the precision-recall curve, starting at (recall 0, precision 1).

    This is ``auc(recall, precision)`` on sklearn's ``precision_recall_curve`` output, which is
    what OpenOOD reports; it is slightly more optimistic than average precision.
    """
    precision = _with_origin(curve.tps / (curve.tps + curve.fps), 1.0)
    recall_step = torch.diff(_with_origin(curve.tps, 0.0)) / curve.n_pos
    return torch.sum(recall_step * (precision[1:] + precision[:-1])) / 2.0


def _collinear_mask(curve: _Curve) -> Tensor:
    """sklearn ``roc_curve(drop_intermediate=True)``: keep ends and points where the slope changes.

    A point is dropped when both count sequences have a zero second difference there; this is
    what OpenOOD's FPR@95 sees, so it is reproduced exactly.
    """
    keep = torch.ones_like(curve.tps, dtype=torch.bool)
    if curve.tps.numel() > 2:
        bend = (torch.diff(curve.fps, n=2) != 0) | (torch.diff(curve.tps, n=2) != 0)
        keep[1:-1] = bend
    return keep


def _fpr_at_tpr(curve: _Curve, drop_intermediate: bool) -> Tensor:
    """``fpr[argmax(tpr >= TPR_LEVEL)]``: the first (lowest FPR) ROC point reaching the TPR level.

    The (0, 0) origin is never that point (its TPR is 0) and the last point has TPR 1, so the search
    always succeeds. TPR is computed as ``tps / n_pos`` in float64 exactly like sklearn, so the
    ``>= 0.95`` comparison flips at the same point even when 0.95 * n_pos is an integer.
    """
    tpr = curve.tps / curve.n_pos
    level = torch.tensor([TPR_LEVEL], dtype=tpr.dtype, device=tpr.device)
    first = int(torch.searchsorted(tpr, level).item())  # tpr is non-decreasing; left side = first >= level
    if drop_intermediate:
        # the kept points at or after `first` are exactly the kept points with tpr >= level
        first = _first_kept_point(curve, first)
    return curve.fps[first] / curve.n_neg


def _first_kept_point(curve: _Curve, start: int) -> int:
    """The first index ``>= start`` that :func:`_collinear_mask` keeps, looking only near ``start``.

    Same rule (ends kept; an interior point kept where either count's second difference is non-zero),
    read on a window that grows until it finds one, instead of a mask over the whole curve."""
    m = curve.tps.numel()
    if start == 0 or start >= m - 1:
        return start
    low, width = start, 256
    while True:
        high = min(low + width, m - 1)  # interior candidates low .. high-1
        window = slice(low - 1, high + 1)
        bend = (torch.diff(curve.fps[window], n=2) != 0) | (torch.diff(curve.tps[window], n=2) != 0)
        hits = bend.nonzero()
        if hits.numel():
            return low + int(hits[0].item())
        if high == m - 1:
            return m - 1
        low, width = high, width * 4


def ood_metrics(id_scores: ScoreArray, ood_scores: ScoreArray) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and both FPR@95 conventions for one (ID, OOD) pair of score sets.

    Args:
        id_scores: 1-D scores of in-distribution samples (higher = more ID). Tensor (any device,
            any real dtype) or numpy array.
        ood_scores: 1-D scores of the OOD samples, same convention.

    Returns:
        ``{"auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood"}`` as python floats in [0, 1]
        (see the module docstring for the exact definitions). Computed on the device of the first
        tensor argument; a second tensor on another device is moved there.

    Raises:
        ValueError: a set is empty, not 1-D, or contains NaN / inf.
        TypeError: a set is complex, boolean or not numeric.
    """
    ids, oods = _prepare(id_scores, ood_scores)
    if ids.device.type == "cpu":
        return _metrics_numpy(ids.numpy(), oods.numpy())
    return _metrics_torch(ids, oods)


def _metrics_torch(ids: Tensor, oods: Tensor) -> dict[str, float]:
    """:func:`ood_metrics` on validated float64 tensors of any device (the accelerator path)."""
    id_pos = _id_positive_curve_sort(ids, oods)
    ood_pos = _flip_curve(id_pos)
    values = torch.stack(
        [
            _auroc(id_pos),
            _aupr(id_pos),
            _aupr(ood_pos),
            _fpr_at_tpr(id_pos, drop_intermediate=False),
            _fpr_at_tpr(ood_pos, drop_intermediate=True),
        ]
    )
    return dict(zip(METRIC_KEYS, values.tolist(), strict=True))  # one host sync for all five


def _metrics_numpy(ids: np.ndarray, oods: np.ndarray) -> dict[str, float]:
    """:func:`ood_metrics` on the CPU: the same formulas as the torch path over the same integer counts,
    written as in-place numpy passes and dot products (every 10^6-long temporary costs as much as the
    arithmetic on it). The OOD-positive curve (:func:`_flip_curve`) is two arrays read backwards."""
    tps, fps = _curve_counts_numpy(ids, oods)
    n_pos, n_neg = len(ids), len(oods)
    out_tps = np.empty_like(fps)  # n_neg - (OOD above the threshold), reversed below
    out_tps[0] = n_neg
    np.subtract(n_neg, fps[:-1], out=out_tps[1:])
    out_fps = np.empty_like(tps)
    out_fps[0] = n_pos
    np.subtract(n_pos, tps[:-1], out=out_fps[1:])
    out_tps, out_fps = out_tps[::-1], out_fps[::-1]
    values = (
        _auroc_numpy(tps, fps, n_pos, n_neg),
        _aupr_numpy(tps, fps, n_pos),
        _aupr_numpy(out_tps, out_fps, n_neg),
        _fpr_at_tpr_numpy(tps, fps, n_pos, n_neg, drop_intermediate=False),
        _fpr_at_tpr_numpy(out_tps, out_fps, n_neg, n_pos, drop_intermediate=True),
    )
    return dict(zip(METRIC_KEYS, values, strict=True))


def _step_sums(values: np.ndarray, origin: float, subtract: bool) -> np.ndarray:
    """``values[k] -/+ values[k-1]`` with ``values[-1] = origin``, one new array."""
    out = np.empty_like(values)
    out[0] = values[0] - origin if subtract else values[0] + origin
    (np.subtract if subtract else np.add)(values[1:], values[:-1], out=out[1:])
    return out


def _auroc_numpy(tps: np.ndarray, fps: np.ndarray, n_pos: int, n_neg: int) -> float:
    """:func:`_auroc`: every product and partial sum is an integer below 2**53, so the dot is exact."""
    return float(np.dot(_step_sums(fps, 0.0, True), _step_sums(tps, 0.0, False))) / (2.0 * n_pos * n_neg)


def _aupr_numpy(tps: np.ndarray, fps: np.ndarray, n_pos: int) -> float:
    """:func:`_aupr`: trapezoids from (recall 0, precision 1)."""
    precision = tps + fps
    np.divide(tps, precision, out=precision)
    return float(np.dot(_step_sums(tps, 0.0, True), _step_sums(precision, 1.0, False))) / (2.0 * n_pos)


def _fpr_at_tpr_numpy(tps: np.ndarray, fps: np.ndarray, n_pos: int, n_neg: int, drop_intermediate: bool) -> float:
    """:func:`_fpr_at_tpr` (with :func:`_first_kept_point`'s local search)."""
    first = int(np.searchsorted(tps / n_pos, TPR_LEVEL, side="left"))
    m = len(tps)
    if drop_intermediate and 0 < first < m - 1:
        low, width = first, 256
        while True:
            high = min(low + width, m - 1)
            bend = (np.diff(fps[low - 1 : high + 1], n=2) != 0) | (np.diff(tps[low - 1 : high + 1], n=2) != 0)
            hits = np.flatnonzero(bend)
            if len(hits):
                first = low + int(hits[0])
                break
            if high == m - 1:
                first = m - 1
                break
            low, width = high, width * 4
    return float(fps[first]) / n_neg


def roc_curve_points(
    id_scores: ScoreArray, ood_scores: ScoreArray, *, drop_intermediate: bool = True
) -> tuple[Tensor, Tensor]:
    """ROC curve with ID as the positive class, for plotting (e.g. TensorBoard figures).

    Returns ``(fpr, tpr)`` float64 tensors on the input's device, starting at (0, 0) and ending at
    (1, 1), equal to ``sklearn.metrics.roc_curve(is_id, score, drop_intermediate=...)[:2]``.
    Collinear points are dropped by default because a 10^6-sample curve otherwise has up to 10^6
    vertices that add nothing to the picture.
    """
    ids, oods = _prepare(id_scores, ood_scores)
    curve = _id_positive_curve(ids, oods)
    tps, fps = curve.tps, curve.fps
    if drop_intermediate:
        keep = _collinear_mask(curve)
        tps, fps = tps[keep], fps[keep]
    return _with_origin(fps, 0.0) / curve.n_neg, _with_origin(tps, 0.0) / curve.n_pos
