"""ood_metrics must reproduce the sklearn calls OpenOOD makes, on awkward inputs included."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

from robustft.ood.metrics import METRIC_KEYS, ScoreArray, ood_metrics, roc_curve_points

SEEDS = [0, 1, 2, 3]
ATOL = 1e-6


def sklearn_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """Reference: exactly the calls of OpenOOD v1.5 plus the ID-positive FPR@95."""
    score = np.concatenate([id_scores, ood_scores]).astype(np.float64)
    is_id = np.concatenate([np.ones(len(id_scores)), np.zeros(len(ood_scores))])
    p_in, r_in, _ = precision_recall_curve(is_id, score)
    p_out, r_out, _ = precision_recall_curve(1 - is_id, -score)
    fpr_id, tpr_id, _ = roc_curve(is_id, score, drop_intermediate=False)
    fpr_ood, tpr_ood, _ = roc_curve(1 - is_id, -score)  # OpenOOD: default drop_intermediate=True
    return {
        "auroc": roc_auc_score(is_id, score),
        "aupr_in": auc(r_in, p_in),
        "aupr_out": auc(r_out, p_out),
        "fpr95": fpr_id[np.argmax(tpr_id >= 0.95)],
        "fpr95_openood": fpr_ood[np.argmax(tpr_ood >= 0.95)],
    }


def assert_matches_sklearn(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    ours = ood_metrics(id_scores, ood_scores)
    ref = sklearn_metrics(np.asarray(id_scores), np.asarray(ood_scores))
    assert set(ours) == set(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert isinstance(ours[key], float)
        assert 0.0 <= ours[key] <= 1.0
        assert ours[key] == pytest.approx(ref[key], abs=ATOL), key
    return ours


@pytest.mark.parametrize("seed", SEEDS)
def test_continuous_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    assert_matches_sklearn(rng.normal(1.0, 1.0, 700), rng.normal(0.0, 1.5, 400))


@pytest.mark.parametrize("seed", SEEDS)
def test_heavily_tied_integer_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    assert_matches_sklearn(rng.integers(0, 4, 300), rng.integers(0, 4, 250))


@pytest.mark.parametrize("seed", range(40))
def test_many_small_tied_problems(seed: int) -> None:
    """Small tied sets hit every corner of the curve bookkeeping (and of the collinear drop)."""
    rng = np.random.default_rng(100 + seed)
    n_id, n_ood = rng.integers(1, 30, size=2)
    assert_matches_sklearn(rng.integers(0, 6, n_id).astype(float), rng.integers(0, 6, n_ood).astype(float))


@pytest.mark.parametrize("seed", SEEDS)
def test_imbalanced(seed: int) -> None:
    rng = np.random.default_rng(seed)
    assert_matches_sklearn(rng.normal(0.5, 1.0, 10), rng.normal(0.0, 1.0, 5000))
    assert_matches_sklearn(rng.normal(0.5, 1.0, 5000), rng.normal(0.0, 1.0, 10))


@pytest.mark.parametrize(
    ("id_scores", "ood_scores"),
    [([1.0], [0.0]), ([0.0], [1.0]), ([0.5], [0.5]), ([2.0], [0.0, 1.0, 3.0, 3.0]), ([0.0, 1.0, 3.0], [1.0])],
)
def test_tiny(id_scores: list[float], ood_scores: list[float]) -> None:
    assert_matches_sklearn(np.array(id_scores), np.array(ood_scores))


@pytest.mark.parametrize("seed", SEEDS)
def test_one_vs_many(seed: int) -> None:
    rng = np.random.default_rng(seed)
    assert_matches_sklearn(rng.normal(0, 1, 1), rng.normal(0, 1, 300))
    assert_matches_sklearn(rng.normal(0, 1, 300), rng.normal(0, 1, 1))


def test_perfect_separation() -> None:
    ours = assert_matches_sklearn(np.linspace(1, 2, 50), np.linspace(-2, 0, 80))
    assert ours == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0, "fpr95_openood": 0.0}


def test_reversed_separation() -> None:
    ours = assert_matches_sklearn(np.linspace(-2, 0, 50), np.linspace(1, 2, 80))
    assert ours["auroc"] == 0.0
    assert ours["fpr95"] == 1.0
    assert ours["fpr95_openood"] == 1.0


def test_all_equal_scores_documented_values() -> None:
    n_id, n_ood = 30, 90
    ours = assert_matches_sklearn(np.full(n_id, 0.3), np.full(n_ood, 0.3))
    n = n_id + n_ood
    assert ours["auroc"] == pytest.approx(0.5)
    assert ours["aupr_in"] == pytest.approx((1 + n_id / n) / 2)
    assert ours["aupr_out"] == pytest.approx((1 + n_ood / n) / 2)
    assert ours["fpr95"] == ours["fpr95_openood"] == 1.0


def test_openood_fpr95_reproduces_collinear_drop() -> None:
    """A case where sklearn's drop_intermediate=True changes OpenOOD's FPR@95 (1.0 instead of 0.5).

    OOD-positive curve (fps, tps) = (0, 18), (1, 19), (2, 20): the 95% point (1, 19) is collinear
    and dropped, so OpenOOD reads FPR at (2, 20).
    """
    id_scores = np.array([10.0, 11.0])
    ood_scores = np.array([-5.0] * 18 + [10.0, 11.0])
    ours = assert_matches_sklearn(id_scores, ood_scores)
    assert ours["fpr95_openood"] == 1.0
    is_ood = np.r_[np.zeros(2), np.ones(20)]
    fpr, tpr, _ = roc_curve(is_ood, -np.r_[id_scores, ood_scores], drop_intermediate=False)
    assert fpr[np.argmax(tpr >= 0.95)] == 0.5  # the un-dropped curve would say 0.5


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_float32_and_tensor_inputs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    id32 = rng.normal(1, 1, 500).astype(np.float32)
    ood32 = rng.normal(0, 1, 500).astype(np.float32)
    expected = assert_matches_sklearn(id32, ood32)
    from_tensors = ood_metrics(torch.from_numpy(id32), torch.from_numpy(ood32))
    mixed = ood_metrics(torch.from_numpy(id32), ood32)
    assert from_tensors == pytest.approx(expected, abs=1e-12)
    assert mixed == pytest.approx(expected, abs=1e-12)


def test_float32_ties_preserved() -> None:
    """Values distinct in float64 but equal in float32 must tie, as sklearn sees the float32 array."""
    id32 = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    ood32 = np.array([np.float32(0.1), np.float32(0.3), np.float32(0.05)], dtype=np.float32)
    assert_matches_sklearn(id32, ood32)


def test_numpy_and_torch_agree_with_grad_and_half() -> None:
    rng = np.random.default_rng(7)
    ids = torch.randn(200, dtype=torch.float64, requires_grad=True)
    oods = torch.from_numpy(rng.normal(-0.5, 1, 150))
    assert ood_metrics(ids, oods) == pytest.approx(ood_metrics(ids.detach().numpy(), oods.numpy()), abs=1e-12)
    half = ood_metrics(ids.detach().half(), oods.half())
    assert half == pytest.approx(sklearn_metrics(ids.detach().half().numpy(), oods.half().numpy()), abs=ATOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    rng = np.random.default_rng(0)
    ids, oods = rng.integers(0, 50, 4000).astype(float), rng.normal(20, 10, 3000).round()
    cpu = ood_metrics(ids, oods)
    gpu = ood_metrics(torch.from_numpy(ids).cuda(), torch.from_numpy(oods).cuda())
    assert gpu == pytest.approx(cpu, abs=1e-12)


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_roc_curve_points_match_sklearn(seed: int, drop: bool) -> None:
    rng = np.random.default_rng(seed)
    ids, oods = rng.integers(0, 8, 120).astype(float), rng.normal(3, 2, 90)
    fpr, tpr = roc_curve_points(ids, oods, drop_intermediate=drop)
    ref_fpr, ref_tpr, _ = roc_curve(
        np.r_[np.ones(120), np.zeros(90)], np.r_[ids, oods], drop_intermediate=drop
    )
    np.testing.assert_allclose(fpr.numpy(), ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr.numpy(), ref_tpr, atol=1e-12)


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("which", "pattern"), [("id", "id_scores is empty"), ("ood", "ood_scores is empty")])
def test_empty_set_is_named(which: str, pattern: str) -> None:
    full, empty = np.ones(5), np.array([])
    args = (empty, full) if which == "id" else (full, empty)
    with pytest.raises(ValueError, match=pattern):
        ood_metrics(*args)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_counted(bad: float) -> None:
    ood = np.array([0.0, bad, 1.0, bad, 2.0])
    with pytest.raises(ValueError, match=r"ood_scores contains 2 non-finite value\(s\).* out of 5"):
        ood_metrics(np.ones(3), ood)
    with pytest.raises(ValueError, match=r"id_scores contains 2 non-finite"):
        ood_metrics(torch.from_numpy(ood), np.ones(3))


@pytest.mark.parametrize("shape", [(4, 3), (1, 5), ()])
def test_non_1d_rejected_with_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=rf"id_scores must be 1-D .*got shape {re.escape(str(shape))}"):
        ood_metrics(torch.zeros(shape), torch.zeros(3))
    with pytest.raises(ValueError, match=r"ood_scores must be 1-D"):
        ood_metrics(np.zeros(3), np.zeros(shape))


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        (torch.tensor([1.0 + 2.0j, 0.5 - 1.0j, 3.0j]), r"id_scores has complex dtype torch\.complex64"),
        (np.array([1.0 + 1.0j, 2.0, 3.0]), r"id_scores has complex dtype complex128"),
        (torch.tensor([True, False, True]), r"id_scores has dtype torch\.bool"),
        (np.array([True, False, True]), r"id_scores has dtype bool"),
        (np.array(["0.1", "0.2", "0.3"]), r"id_scores has non-numeric dtype <U3"),
    ],
)
def test_non_real_scores_are_refused_not_cast(bad: ScoreArray, pattern: str) -> None:
    """A cast to float64 would drop the imaginary part (or hide decisions posing as scores)."""
    with pytest.raises(TypeError, match=pattern + r".*score function must return real values"):
        ood_metrics(bad, np.ones(3))
    with pytest.raises(TypeError, match=r"ood_scores has"):
        ood_metrics(np.ones(3), bad)
    with pytest.raises(TypeError, match=r"ood_scores has"):
        roc_curve_points(np.ones(3), bad)
