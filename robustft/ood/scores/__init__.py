"""Post-hoc OOD scores as pure tensor code: **higher score = more in-distribution**.

A score is built by name (``build_score("knn", k=50)``), optionally fitted once per evaluation on the
outputs of the ID *training* set (``score.fit(reference, head)``), and then called on batches of a
method's ``forward_eval`` outputs (``score(outputs) -> [B]``). Nothing here imports Lightning or knows
about models: the method supplies the output dict, the reference dict and, for scores that re-run the
classifier, its final linear layer ``head = (W [K, D], b [K])``.

Contract of every score class (see :class:`OODScore`):

* ``requires``: keys of the output dict the score reads (``{"logits"}`` or ``{"features"}``); a feature
  score instance reads its ``feature_key`` instead of ``"features"`` (see :class:`FeatureScore`);
* ``needs_head``: the score recomputes logits through the linear head (ViM, ReAct, ASH); the head is
  passed to :meth:`OODScore.fit` (``reference`` may then be ``{}`` when ``needs_fit`` is false);
* ``needs_fit``: the score needs statistics of the ID training outputs (KNN, MDS, RMDS, ViM, ReAct);
  calling it before :meth:`OODScore.fit` raises ``RuntimeError``;
* ``search_space``: a grid for tuning on an OOD *validation* set (:func:`tune_score`, OpenOOD's APS).

Every score that reads features (KNN, MDS, RMDS, ViM, ReAct, ASH) takes ``feature_key`` (default
``"features"``): ``model.score_kwargs: {knn: {feature_key: embedding, k: 50}}`` runs KNN on a method's
``embedding`` output (which the method must list in ``output_keys()``).

One module per score family, as OpenOOD's ``postprocessors``:

==========================  ==========================================================================
module                      contents
==========================  ==========================================================================
:mod:`.base`                :class:`OODScore`, :class:`FeatureScore`, the :data:`SCORES` registry
:mod:`.logit`               MSP, MaxLogit, Energy, GEN
:mod:`.distance`            KNN, MDS, RMDS
:mod:`.head`                ViM, ReAct, ASH (re-run the linear head)
:mod:`.tuning`              :func:`build_score`, :func:`check_score_requirements`, :func:`tune_score`
==========================  ==========================================================================

Scores (defaults from the papers, OpenOOD v1.5 ``configs/postprocessors/*.yml`` where the papers leave
a choice open; each class docstring says which):

==========  ==============================  =====================================================
name        class                           score
==========  ==============================  =====================================================
msp         :class:`MSPScore`               max softmax probability
maxlogit    :class:`MaxLogitScore`          max logit (alias ``mls``)
energy      :class:`EnergyScore`            ``T * logsumexp(logits / T)`` (alias ``ebo``)
gen         :class:`GENScore`               generalized entropy of the top-M probabilities
knn         :class:`KNNScore`               minus distance to the k-th nearest ID feature
mds         :class:`MahalanobisScore`       minus min class-conditional Mahalanobis distance
rmds        :class:`RelativeMahalanobisScore`  same, relative to a class-agnostic Gaussian
mahalanobis_global  :class:`GlobalMahalanobisScore`  minus Mahalanobis distance to one Gaussian of all
                                                 normalised ID features (PALM's evaluation)
vim         :class:`ViMScore`               energy minus scaled residual norm (virtual logit)
react       :class:`ReActScore`             energy after clipping features at an ID percentile
ash         :class:`ASHScore`               energy after per-sample activation shaping
==========  ==============================  =====================================================

The CLIP scores (MCM, GL-MCM, NegLabel) live in :mod:`robustft.ood.clip_scores` and register here when
:mod:`robustft.ood` is imported.

Numerics: logit and feature scores run in the input's floating dtype (at least float32); MDS/RMDS
quadratic forms and all fitted statistics (covariances, pseudo-inverses, eigenvectors) use float64.
The result is float32, or float64 when the inputs are float64. Fitted statistics move to the device of
the outputs on the first call.
"""

from __future__ import annotations

from robustft.ood.scores.base import (
    DEFAULT_FEATURE_KEY,
    SCORES,
    FeatureScore,
    Head,
    OODScore,
)

# private helpers kept importable from here (robustft.ood.clip_scores uses _floating and _result)
from robustft.ood.scores.base import _check_head as _check_head
from robustft.ood.scores.base import _dedupe as _dedupe
from robustft.ood.scores.base import _features as _features
from robustft.ood.scores.base import _floating as _floating
from robustft.ood.scores.base import _fmt_set as _fmt_set
from robustft.ood.scores.base import _result as _result
from robustft.ood.scores.base import _unknown_hyperparameters as _unknown_hyperparameters
from robustft.ood.scores.distance import KNNScore, MahalanobisScore, RelativeMahalanobisScore
from robustft.ood.scores.head import ASHScore, ReActScore, ViMScore, ash, percentile
from robustft.ood.scores.head import _ash_variant as _ash_variant
from robustft.ood.scores.logit import (
    EnergyScore,
    GENScore,
    MaxLogitScore,
    MSPScore,
    energy,
    generalized_entropy,
)
from robustft.ood.scores.tuning import build_score, check_score_requirements, tune_score

__all__ = [
    "DEFAULT_FEATURE_KEY",
    "SCORES",
    "ASHScore",
    "EnergyScore",
    "FeatureScore",
    "GENScore",
    "Head",
    "KNNScore",
    "MSPScore",
    "MahalanobisScore",
    "MaxLogitScore",
    "OODScore",
    "ReActScore",
    "RelativeMahalanobisScore",
    "ViMScore",
    "ash",
    "build_score",
    "check_score_requirements",
    "energy",
    "generalized_entropy",
    "percentile",
    "tune_score",
]

