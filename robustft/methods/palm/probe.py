"""The evaluation-time linear probe that gives PALM's report its ID accuracy.

PALM trains no classifier (OpenOOD #237: its ID accuracy is "N/A"), but the shared report has an ID
accuracy line. Rather than a fake number, :class:`~robustft.methods.palm.PALM` fits this probe on the
frozen features of the ID training set at every evaluation and says so in the report's meta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fit_linear_probe"]


def fit_linear_probe(
    features: Tensor, labels: Tensor, num_classes: int, weight_decay: float = 1e-4, steps: int = 100
) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression ``(W [K, D], b [K])`` on ``features`` [N, D], full-batch L-BFGS
    from zero, loss ``CE + weight_decay / 2 * ||W||^2``. Deterministic (no sampling), so every rank
    (which holds the same gathered reference) and every evaluation of one checkpoint fit the same probe.
    Runs with gradients enabled even inside ``no_grad`` / ``inference_mode`` evaluation code."""
    with torch.inference_mode(False), torch.enable_grad():
        x = features.detach().clone().float()
        y = labels.detach().clone().long().to(x.device)
        weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
        bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        if len(x):
            optimizer.step(closure)
    return weight.detach(), bias.detach()
