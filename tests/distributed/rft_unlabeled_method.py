"""A test-only method that consumes the unlabelled stream (``data.unlabeled``), loaded by the CLI
subprocesses of tests/distributed/test_resume_unlabeled.py (this folder is on their ``PYTHONPATH``).

It keeps :class:`~robustft.methods.Classifier`'s constructor (so LightningCLI parses the same arguments)
and only adds a loss term: the mean prediction entropy of the unlabelled images (entropy minimisation,
the simplest semi-supervised term), so the unlabelled order and augmentations shape the weights.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from robustft.methods import Classifier


class EntropyOnUnlabeled(Classifier):
    """Cross-entropy on ``batch["labeled"]`` + 0.1 x mean entropy of the predictions on ``batch["unlabeled"]``."""

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        if "labeled" not in batch:  # no unlabelled stream configured: plain Classifier
            return super().training_losses(batch)
        losses = super().training_losses(batch["labeled"])
        log_probs = self(batch["unlabeled"]["image"]).log_softmax(-1)
        losses["entropy"] = 0.1 * -(log_probs.exp() * log_probs).sum(-1).mean()
        return losses
