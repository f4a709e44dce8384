"""Callbacks: per-epoch OOD evaluation (and, later, weight averaging)."""

from robustft.callbacks.ood_eval import OODEvaluation, flatten_report

__all__ = ["OODEvaluation", "flatten_report"]
