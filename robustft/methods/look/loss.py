"""The LOOK loss as pure functions: leave-one-out soft kNN over a memory of labelled keys.

Spec ``../shared/specs/methods-robust-finetuning.md`` section 4(c). For a query ``q_i`` (L2-normalised
embedding of image ``i``) and candidate keys ``k_j`` with labels ``y_j`` and sample ids ``id_j``:

- ``C_i`` = the candidates minus every key whose id equals ``id_i`` (leave-one-out: the sample's own key,
  from any view or any earlier epoch, is never its neighbour);
- ``N_k(i)`` = the ``k`` candidates of largest ``s_ij = q_i . k_j`` (hard top-k; the *selection* carries
  no gradient, the selected similarities do);
- ``P(y_i | x_i) = sum_{j in N_k(i), y_j = y_i} exp(s_ij / tau) / sum_{j in N_k(i)} exp(s_ij / tau)``;
- ``loss = mean_i -log(P(y_i | x_i) + delta)``.

``k = None`` (or ``k >= |C_i|``) is NCA over the memory. A query with no same-label key among its
top-k neighbours is an *orphan*: ``P = 0``. Three policies [CHOICE, spec 4(h)]:

- ``guard``: keep it with ``-log(delta)`` (a constant: no gradient) -- the loss stays finite;
- ``drop``: leave it out of the mean (the loss is the mean over non-orphans);
- ``positive``: append its nearest same-label candidate (outside the top-k) to ``N_k(i)``, a
  "guaranteed positive"; a query without any same-label candidate at all is then dropped.

``form="supcon"`` is the SupCon-style control on the same neighbour set: ``-mean_{p in pos(i)} log
softmax_i(s / tau)_p``, i.e. every positive must be close, not just their sum. With ``k=None`` and
``leave_one_out=False`` it is SupCon with a momentum memory (the other view of the query is a positive);
anchors without any positive are always dropped (SupCon's sum over positives is empty there).

Everything is vectorised over the batch (one ``[B, N]`` similarity matrix); a brute-force loop in the
tests checks it. ``N`` = batch keys + queue: fine for the queues used here; chunk the top-k for 65k-entry
queues on memory-tight devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KNNLoss", "LossForm", "Neighbours", "OrphanPolicy", "knn_class_probs", "knn_loss", "select_neighbours"]

OrphanPolicy = Literal["guard", "drop", "positive"]
LossForm = Literal["look", "supcon"]
ORPHAN_POLICIES = ("guard", "drop", "positive")
LOSS_FORMS = ("look", "supcon")


@dataclass
class Neighbours:
    """The top-k neighbours of every query: similarities (with gradient), labels, and which are real."""

    sims: Tensor  # [B, k'] s_ij of the selected candidates (differentiable w.r.t. the queries)
    labels: Tensor  # [B, k'] their labels
    valid: Tensor  # [B, k'] False where fewer than k' candidates were available


@dataclass
class KNNLoss:
    """Result of :func:`knn_loss`."""

    loss: Tensor  # scalar: mean of per_sample over `included`
    per_sample: Tensor  # [B] per-query loss (0 where not included)
    included: Tensor  # [B] bool: queries counted in the mean
    orphan: Tensor  # [B] bool: no same-label key among the top-k (before any guaranteed positive)
    probs: Tensor  # [B, C] detached soft-kNN class probabilities (the kNN classifier's vote)


def select_neighbours(sims: Tensor, labels: Tensor, excluded: Tensor, k: int | None) -> Neighbours:
    """Hard top-k of ``sims`` [B, N] among the candidates not ``excluded`` [B, N]; ``k=None``: all."""
    n = sims.shape[1]
    kk = n if k is None else min(int(k), n)
    masked = sims.detach().masked_fill(excluded, float("-inf"))
    values, index = masked.topk(kk, dim=1)
    return Neighbours(sims.gather(1, index), labels[index], torch.isfinite(values))


def knn_class_probs(neigh: Neighbours, temperature: float, num_classes: int) -> Tensor:
    """``[B, C]`` soft-kNN class probabilities ``sum_j softmax(s / tau)_j 1[y_j = c]`` over the valid
    neighbours (detached); rows without any neighbour are all zeros."""
    with torch.no_grad():
        logits = (neigh.sims.float() / temperature).masked_fill(~neigh.valid, float("-inf"))
        any_valid = neigh.valid.any(1, keepdim=True)
        weights = torch.where(any_valid, logits, torch.zeros_like(logits)).softmax(1) * neigh.valid
        probs = torch.zeros(len(logits), num_classes, device=logits.device, dtype=logits.dtype)
        return probs.scatter_add_(1, neigh.labels.clamp(0, num_classes - 1), weights * (neigh.labels >= 0))


def knn_loss(
    queries: Tensor,
    labels: Tensor,
    ids: Tensor,
    keys: Tensor,
    key_labels: Tensor,
    key_ids: Tensor,
    *,
    k: int | None,
    temperature: float,
    orphans: OrphanPolicy = "guard",
    form: LossForm = "look",
    leave_one_out: bool = True,
    key_valid: Tensor | None = None,
    num_classes: int | None = None,
    delta: float = 1e-12,
) -> KNNLoss:
    """The LOOK (or SupCon-style) loss of ``queries`` [B, D] against ``keys`` [N, D] (module docstring).

    Args:
        queries, keys: L2-normalised embeddings (the function does not normalise; keys carry no gradient
            in LOOK, but gradients flow to whatever requires them).
        labels, ids: [B] of the queries; key_labels, key_ids: [N] of the keys.
        k: neighbours; ``None``: every candidate (NCA).
        temperature: tau > 0.
        orphans: ``guard`` | ``drop`` | ``positive``.
        form: ``look`` (log of the summed same-label probability) or ``supcon`` (mean log-probability
            of each same-label neighbour).
        leave_one_out: exclude keys with the query's id.
        key_valid: [N] bool, which keys exist (a queue's unfilled slots are False); default all.
        num_classes: width of ``probs``; default ``max label + 1``.
        delta: the guard against ``log 0``.
    """
    if orphans not in ORPHAN_POLICIES:
        raise ValueError(f"orphans must be one of {ORPHAN_POLICIES}, got {orphans!r}")
    if form not in LOSS_FORMS:
        raise ValueError(f"form must be one of {LOSS_FORMS}, got {form!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if k is not None and int(k) < 1:
        raise ValueError(f"k must be >= 1 or None (all candidates), got {k}")
    sims = queries @ keys.to(queries.dtype).T
    excluded = torch.zeros_like(sims, dtype=torch.bool)
    if key_valid is not None:
        excluded |= ~key_valid.bool()[None, :]
    if leave_one_out:
        excluded |= ids[:, None] == key_ids[None, :]
    neigh = select_neighbours(sims, key_labels, excluded, k)
    same = (neigh.labels == labels[:, None]) & neigh.valid
    orphan = ~same.any(1)
    plain = neigh  # the kNN classifier's vote never sees a guaranteed positive (it would know the label)
    if orphans == "positive":
        candidates = (key_labels[None, :] == labels[:, None]) & ~excluded
        nearest = sims.detach().masked_fill(~candidates, float("-inf")).argmax(1, keepdim=True)
        add = (orphan & candidates.any(1))[:, None]
        neigh = Neighbours(
            torch.cat([neigh.sims, sims.gather(1, nearest)], 1),
            torch.cat([neigh.labels, key_labels[nearest]], 1),
            torch.cat([neigh.valid, add], 1),
        )
        same = torch.cat([same, add], 1)
    has_any = neigh.valid.any(1)
    logits = (neigh.sims / temperature).masked_fill(~neigh.valid, float("-inf"))
    logits = torch.where(has_any[:, None], logits, torch.zeros_like(logits))  # no NaN in empty rows
    if form == "look":
        p_same = (logits.softmax(1) * same).sum(1)
        per_sample = -torch.log(p_same + delta)
        included = {"guard": has_any, "drop": ~orphan, "positive": same.any(1)}[orphans]
    else:
        log_p = logits.log_softmax(1).masked_fill(~same, 0.0)
        per_sample = -log_p.sum(1) / same.sum(1).clamp(min=1)
        included = same.any(1)
    per_sample = per_sample * included
    loss = per_sample.sum() / included.sum().clamp(min=1)
    width = int(num_classes) if num_classes is not None else int(max(labels.max(), key_labels.max())) + 1
    return KNNLoss(loss, per_sample, included, orphan, knn_class_probs(plain, temperature, width))


def normalize(x: Tensor) -> Tensor:
    """L2 normalisation along the last dimension (the embedding every LOOK similarity uses)."""
    return F.normalize(x, dim=-1)
