"""Logit-based scores: MSP, MaxLogit, Energy, GEN (read ``logits`` [B, K]; no fitting, no head)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from robustft.ood.scores.base import SCORES, OODScore, _floating

__all__ = ["EnergyScore", "GENScore", "MSPScore", "MaxLogitScore", "energy", "generalized_entropy"]


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative free energy ``T * logsumexp(logits / T)`` over the last dimension (Liu et al. 2020)."""
    return temperature * torch.logsumexp(logits / temperature, dim=-1)


def generalized_entropy(probs: Tensor, gamma: float = 0.1, top_m: int = 100) -> Tensor:
    """GEN score ``-sum_{top-M p} p^gamma (1 - p)^gamma`` (Liu et al. 2023); higher = more ID."""
    m = min(int(top_m), probs.shape[-1])
    top = probs.topk(m, dim=-1).values
    return -(top.pow(gamma) * (1.0 - top).clamp_min(0).pow(gamma)).sum(dim=-1)


@SCORES.register("msp")
class MSPScore(OODScore):
    """Maximum softmax probability (Hendrycks & Gimpel 2017). No hyper-parameters; in [1/K, 1]."""

    name = "msp"
    requires = frozenset({"logits"})

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        logits = _floating(outputs["logits"])
        return logits.softmax(dim=-1).amax(dim=-1)


@SCORES.register("maxlogit")
@SCORES.register("mls")
class MaxLogitScore(OODScore):
    """Maximum logit (Hendrycks et al. 2022, "MLS" in OpenOOD). No hyper-parameters."""

    name = "maxlogit"
    requires = frozenset({"logits"})

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        return _floating(outputs["logits"]).amax(dim=-1)


@SCORES.register("energy")
@SCORES.register("ebo")
class EnergyScore(OODScore):
    """Energy score (Liu et al. 2020): ``T * logsumexp(logits / T)``.

    Default ``temperature=1`` (paper and OpenOOD ``ebo.yml``); grid ``[1, 10, 100, 1000]`` is OpenOOD's
    ``temperature_list``. As T grows the score tends to ``T log K + mean(logits)``; as T -> 0 to the max
    logit.
    """

    name = "energy"
    requires = frozenset({"logits"})
    search_space = {"temperature": [1.0, 10.0, 100.0, 1000.0]}

    def __init__(self, *, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"energy temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        return energy(_floating(outputs["logits"]), self.temperature)


@SCORES.register("gen")
class GENScore(OODScore):
    """Generalized ENtropy (Liu, Lochman & Zach, CVPR 2023).

    ``score = -sum over the M largest softmax probabilities of p^gamma (1 - p)^gamma``. Defaults
    ``gamma=0.1``, ``M=100`` (paper and OpenOOD ``gen.yml``; ``M`` larger than the number of classes uses
    all classes). Grid = OpenOOD's ``gamma_list`` x ``M_list``.
    """

    name = "gen"
    requires = frozenset({"logits"})
    search_space = {"gamma": [0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0], "M": [10, 50, 100, 200, 500, 1000]}

    def __init__(self, *, gamma: float = 0.1, M: int = 100) -> None:
        super().__init__()
        if not gamma > 0:
            raise ValueError(f"GEN gamma must be > 0, got {gamma}")
        if int(M) < 1:
            raise ValueError(f"GEN M must be >= 1, got {M}")
        self.gamma = float(gamma)
        self.M = int(M)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        probs = _floating(outputs["logits"]).softmax(dim=-1)
        return generalized_entropy(probs, self.gamma, self.M)
