"""Callbacks: per-epoch OOD evaluation and weight averaging (WiSE-FT / BANG after fit)."""

from robustft.callbacks.export_clip import ExportCLIPWeights
from robustft.callbacks.ood_eval import OODEvaluation, flatten_report
from robustft.callbacks.weight_averaging import WeightAveraging

__all__ = ["ExportCLIPWeights", "OODEvaluation", "WeightAveraging", "flatten_report"]
