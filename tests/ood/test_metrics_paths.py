"""The CPU (numpy) and accelerator (torch) paths of robustft.ood.metrics agree, and the local FPR@95 search equals the
full collinear mask (issue 18 made the CPU path numpy-based and the OpenOOD FPR@95 search local).

The accelerator path (``_id_positive_curve_sort``) runs on CPU tensors here, so CI without a GPU still
checks it against the CPU path (``_id_positive_curve_merge``) on ties, duplicates and signed zeros.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustft.ood import metrics as M


def _cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    cases = [(rng.normal(1, 1, 3000), rng.normal(0, 1, 2000))]
    cases += [(rng.integers(0, k, 400).astype(float), rng.integers(0, k, 300).astype(float)) for k in (1, 2, 3, 7, 50)]
    cases += [(np.array([0.0, -0.0, 1.0]), np.array([-0.0, 0.0, 0.0])), (np.array([5.0]), np.array([5.0, 4.0]))]
    # one ID and one OOD per value: every interior ROC point is collinear, so the local search has to grow
    # its window past the first 256 points to reach the kept end
    cases += [(np.arange(700.0), np.arange(700.0))]
    return cases


@pytest.mark.parametrize("case", range(len(_cases())))
def test_merge_and_sort_curves_are_identical(case: int) -> None:
    ids, oods = (torch.from_numpy(x) for x in _cases()[case])
    merged = M._id_positive_curve_merge(ids, oods)
    sorted_ = M._id_positive_curve_sort(ids, oods)
    assert torch.equal(merged.tps, sorted_.tps) and torch.equal(merged.fps, sorted_.fps)
    assert merged.tps.dtype == torch.float64 and (merged.n_pos, merged.n_neg) == (len(ids), len(oods))


@pytest.mark.parametrize("case", range(len(_cases())))
def test_local_search_equals_full_collinear_mask(case: int) -> None:
    ids, oods = (torch.from_numpy(x) for x in _cases()[case])
    for curve in (M._id_positive_curve(ids, oods), M._flip_curve(M._id_positive_curve(ids, oods))):
        keep = M._collinear_mask(curve)
        kept = torch.nonzero(keep).squeeze(1)
        for start in range(curve.tps.numel()):
            expected = int(kept[kept >= start][0])
            assert M._first_kept_point(curve, start) == expected


@pytest.mark.parametrize("case", range(len(_cases())))
def test_numpy_and_torch_metric_paths_agree(case: int) -> None:
    """The CPU metrics (numpy, in-place passes and dot products) against the accelerator metrics (torch),
    both on the same scores: identical up to the order of floating additions."""
    ids, oods = _cases()[case]
    on_cpu = M._metrics_numpy(ids.astype(np.float64), oods.astype(np.float64))
    portable = M._metrics_torch(torch.from_numpy(ids.astype(np.float64)), torch.from_numpy(oods.astype(np.float64)))
    assert on_cpu == pytest.approx(portable, abs=1e-12)
