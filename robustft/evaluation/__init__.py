"""Evaluation shared by the per-epoch callback and the ``evaluate`` subcommand."""

from robustft.evaluation.distributed import ShardSampler, gather_by_index
from robustft.evaluation.engine import (
    EvaluationConfigError,
    EvaluationResult,
    collect_outputs,
    evaluate_model,
)

__all__ = [
    "EvaluationConfigError",
    "EvaluationResult",
    "ShardSampler",
    "collect_outputs",
    "evaluate_model",
    "gather_by_index",
]
