"""CLIPN's OOD scores and threshold-free decisions: Competing-to-Win (CTW) and Agreeing-to-Differ (ATD).

CLIPN (Wang et al., ICCV 2023) gives every ID class k a "yes" logit ``l_k = s·cos(f, w_k)`` (the ordinary
zero-shot logit) and a "no" logit ``m_k = s·cos(f, u_k)`` from its "no" text tower. From them:

* ``p_k = softmax_k(l)``: the zero-shot class probabilities (CLIPN leaves classification unchanged);
* ``q_k = exp(l_k) / (exp(l_k) + exp(m_k)) = sigmoid(l_k - m_k)``: the per-class "yes" probability.

==========  ====================  ==============================================  =======================================
name        class                 score (higher = more ID)                        threshold-free OOD decision
==========  ====================  ==============================================  =======================================
ctw         :class:`CTWScore`     ``q_ŷ`` with ``ŷ = argmax_k p_k``               ``q_ŷ < 0.5``
atd         :class:`ATDScore`     ``Σ_k p_k q_k``                                 ``1 - Σ_k p_k q_k > max_k p_k q_k``
==========  ====================  ==============================================  =======================================

(ATD treats OOD as a (K+1)-th class with probability ``p_{K+1} = Σ_k p_k (1 - q_k)``.) Both scores read
the method's ``logits`` (the yes logits) and ``no_logits`` ``[B, K]``; the scale ``s`` is the method's
business (official CLIPN: a hard-coded 100). :func:`ctw_decision` / :func:`atd_decision` return the
rules' decisions (``True`` = OOD) for per-sample predictions.

Importing :mod:`robustft.ood` registers the scores in :data:`robustft.ood.scores.SCORES`.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from robustft.ood.scores import SCORES, OODScore, _floating, _result

__all__ = [
    "ATDScore",
    "CTWScore",
    "atd",
    "atd_decision",
    "clipn_probabilities",
    "ctw",
    "ctw_decision",
]


def clipn_probabilities(logits: Tensor, no_logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(p, q)``: ``p = softmax(logits)`` over classes and ``q = sigmoid(logits - no_logits)`` per class."""
    if logits.shape != no_logits.shape or logits.ndim != 2:
        raise ValueError(
            f"'logits' and 'no_logits' must both be [B, K] tensors, got {tuple(logits.shape)} and {tuple(no_logits.shape)}"
        )
    return logits.softmax(dim=-1), (logits - no_logits).sigmoid()


def ctw(logits: Tensor, no_logits: Tensor) -> Tensor:
    """Competing-to-win score ``q_ŷ``, ``ŷ = argmax_k logits_k`` (the zero-shot prediction)."""
    _, q = clipn_probabilities(logits, no_logits)
    return q.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)


def atd(logits: Tensor, no_logits: Tensor) -> Tensor:
    """Agreeing-to-differ score ``Σ_k p_k q_k`` = 1 - probability of the (K+1)-th, OOD, class."""
    p, q = clipn_probabilities(logits, no_logits)
    return (p * q).sum(dim=1)


def ctw_decision(logits: Tensor, no_logits: Tensor) -> Tensor:
    """``[B]`` bool, True = OOD: the "no" probability of the predicted class wins (``q_ŷ < 0.5``)."""
    return ctw(logits, no_logits) < 0.5


def atd_decision(logits: Tensor, no_logits: Tensor) -> Tensor:
    """``[B]`` bool, True = OOD: the OOD class ``p_{K+1} = 1 - Σ_k p_k q_k`` beats every ID class ``p_k q_k``."""
    p, q = clipn_probabilities(logits, no_logits)
    joint = p * q
    return 1.0 - joint.sum(dim=1) > joint.amax(dim=1)


class _CLIPNScore(OODScore):
    requires = frozenset({"logits", "no_logits"})

    def _inputs(self, outputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits, no_logits = _floating(outputs["logits"]), _floating(outputs["no_logits"])
        if logits.shape != no_logits.shape or logits.ndim != 2:
            raise ValueError(
                f"score '{self.name}': 'logits' and 'no_logits' must both be [B, K], got "
                f"{tuple(logits.shape)} and {tuple(no_logits.shape)}"
            )
        return logits, no_logits


@SCORES.register("ctw")
class CTWScore(_CLIPNScore):
    """CLIPN competing-to-win: the yes-probability ``sigmoid(l_ŷ - m_ŷ)`` of the predicted class ŷ.

    In [0, 1]; threshold-free rule: OOD iff below 0.5 (:func:`ctw_decision`). The README of the official
    code reports it clearly weaker than ATD (ViT-B-16 ImageNet AUROC 87.3 vs 93.5).
    """

    name = "ctw"

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        logits, no_logits = self._inputs(outputs)
        return _result(ctw(logits, no_logits), logits)


@SCORES.register("atd")
class ATDScore(_CLIPNScore):
    """CLIPN agreeing-to-differ: ``Σ_k softmax_k(l) · sigmoid(l_k - m_k)``, CLIPN's headline score.

    In [0, 1]; exactly 1 when the no tower never fires (``m ≡ -∞``). Threshold-free rule: OOD iff
    ``1 - score > max_k p_k q_k`` (:func:`atd_decision`).
    """

    name = "atd"

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        logits, no_logits = self._inputs(outputs)
        return _result(atd(logits, no_logits), logits)
