"""Time ``robustft.ood.metrics.ood_metrics`` against the sklearn calls OpenOOD makes.

Why: OOD evaluation runs one metric row per (OOD set, score) on up to ~10^6 gathered scores, and
the sklearn reference (five calls, five sorts) dominates evaluation time on large sets. This script
checks the torch version is both faster and numerically identical on the same inputs, and prints its
cost as a multiple of one sort of the same scores (the floor of any exact computation): ``torch.sort``
(values and indices, what the accelerator path uses) and numpy's value-only sort (what the CPU path
builds on).

Usage::

    python tools/bench_metrics.py [--n-id 500000] [--n-ood 500000] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

from robustft.ood.metrics import METRIC_KEYS, TPR_LEVEL, ood_metrics


def sklearn_reference(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """The same five numbers computed the OpenOOD way, one sklearn call (and sort) each."""
    score = np.concatenate([id_scores, ood_scores])
    is_id = np.concatenate([np.ones(id_scores.size), np.zeros(ood_scores.size)])
    precision_in, recall_in, _ = precision_recall_curve(is_id, score)
    precision_out, recall_out, _ = precision_recall_curve(1 - is_id, -score)
    fpr_id, tpr_id, _ = roc_curve(is_id, score, drop_intermediate=False)
    fpr_ood, tpr_ood, _ = roc_curve(1 - is_id, -score)
    return {
        "auroc": float(roc_auc_score(is_id, score)),
        "aupr_in": float(auc(recall_in, precision_in)),
        "aupr_out": float(auc(recall_out, precision_out)),
        "fpr95": float(fpr_id[np.argmax(tpr_id >= TPR_LEVEL)]),
        "fpr95_openood": float(fpr_ood[np.argmax(tpr_ood >= TPR_LEVEL)]),
    }


def best_time(fn: Callable[[], dict[str, float]], repeats: int) -> tuple[float, dict[str, float]]:
    """Best wall time over ``repeats`` runs (the least noisy estimate) and the last result."""
    best, result = float("inf"), {}
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-id", type=int, default=500_000)
    parser.add_argument("--n-ood", type=int, default=500_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="device for the torch version (cpu, cuda)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    rng = np.random.default_rng(args.seed)
    id_np = rng.normal(1.0, 1.0, args.n_id)
    ood_np = rng.normal(0.0, 1.0, args.n_ood)
    id_t = torch.from_numpy(id_np).to(args.device)
    ood_t = torch.from_numpy(ood_np).to(args.device)

    ood_metrics(id_t, ood_t)  # warm-up: allocator, CUDA context, kernels
    pooled = torch.cat([id_t, ood_t])
    t_torch, ours = best_time(lambda: ood_metrics(id_t, ood_t), args.repeats)
    t_sk, ref = best_time(lambda: sklearn_reference(id_np, ood_np), args.repeats)
    # the floors: one sort of the pooled scores (what any exact ROC computation needs at least)
    t_sort, _ = best_time(lambda: torch.sort(pooled, descending=True), args.repeats)
    pooled_np = pooled.cpu().numpy()
    t_npsort, _ = best_time(lambda: np.sort(pooled_np), args.repeats)

    max_diff = max(abs(ours[k] - ref[k]) for k in METRIC_KEYS)
    print(
        f"n = {args.n_id} ID + {args.n_ood} OOD, float64, device {args.device}, "
        f"torch threads {torch.get_num_threads()}, best of {args.repeats}"
    )
    for key in METRIC_KEYS:
        print(f"  {key:<14} torch {ours[key]:.12f}  sklearn {ref[key]:.12f}")
    print(f"torch:   {t_torch * 1e3:8.1f} ms")
    print(f"sklearn: {t_sk * 1e3:8.1f} ms")
    print(f"one torch.sort of the {len(pooled)} pooled scores (with indices): {t_sort * 1e3:8.1f} ms")
    print(f"one numpy value-only sort of the pooled scores:                {t_npsort * 1e3:8.1f} ms")
    print(f"speed-up: {t_sk / t_torch:.1f}x   max |diff| over the five metrics: {max_diff:.3e}")
    print(f"ood_metrics cost = {t_torch / t_sort:.2f}x one torch.sort = {t_torch / t_npsort:.1f}x one numpy value sort")


if __name__ == "__main__":
    main()
