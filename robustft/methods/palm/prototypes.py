"""PALM's prototype machinery as pure tensor functions (no Lightning, no module state).

PALM (Lu et al., ICLR 2024; spec ``../shared/specs/methods-ood-detection.md`` section 4) models each ID
class as a mixture of ``M`` von Mises-Fisher components on the unit sphere, one prototype each. The
``K * M`` prototypes are **interleaved** as in the official code: prototype ``p`` belongs to class
``p mod K`` (class ``c`` owns ``c, c + K, c + 2K, ...``); :func:`prototype_labels` gives that layout.

One training step on view-major embeddings ``z`` [N, D] (N = views x batch) with labels ``y`` [N]:

1. :func:`sinkhorn` -- balanced soft assignment ``Q`` of samples to *all* prototypes (labels unused);
2. :func:`assignment_weights` -- keep the sample's own-class prototypes (``own_class=False``: all,
   the unlabelled variant), then its ``top_k`` largest; L1 per sample, then L1 per prototype;
3. :func:`ema_update` -- ``mu_p <- normalize(alpha mu_p + (1 - alpha) sum_i W_ip z_i)`` **before** the
   loss; a prototype no sample is assigned to keeps its exact value;
4. :func:`loss_weights` -- Sinkhorn again with the updated prototypes, masked by the own-class mask and
   the top-k positions re-selected from step 2's (prototype-normalised) matrix, L1 per sample;
5. :func:`mle_loss` -- soft-target cross-entropy of ``softmax_p(z_i . mu_p / tau)`` over ALL prototypes
   (issue #6 of the official repo: an unweighted denominator over every class is the official
   behaviour, not a bug);
6. :func:`prototype_contrastive_loss` -- prototypes of one class attract, all others repel (tau_p 0.5).

Everything runs in float32 (the callers cast): ``exp(z . mu / 0.05)`` reaches ``e^20`` and would
overflow float16 under AMP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "assignment_weights",
    "class_mask",
    "ema_update",
    "init_prototypes",
    "loss_weights",
    "mle_loss",
    "prototype_contrastive_loss",
    "prototype_labels",
    "sinkhorn",
    "topk_mask",
]


def prototype_labels(num_classes: int, per_class: int, device: torch.device | None = None) -> Tensor:
    """Class of each of the ``num_classes * per_class`` prototypes: ``p mod num_classes`` (interleaved)."""
    return torch.arange(num_classes, device=device).repeat(per_class)


def init_prototypes(num_prototypes: int, dim: int, seed: int) -> Tensor:
    """Uniform ``[0, 1)^dim`` draws, L2-normalised (all in the positive orthant, as the official code),
    from a private generator so every rank and every run with this seed starts from the same prototypes."""
    generator = torch.Generator().manual_seed(int(seed))
    return F.normalize(torch.rand(num_prototypes, dim, generator=generator), dim=1)


def sinkhorn(z: Tensor, prototypes: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Balanced soft assignment ``[N, P]`` of ``z`` [N, D] to ``prototypes`` [P, D]; every row sums to 1.

    ``Q = exp(z mu^T / epsilon)`` scaled to total mass 1, then ``iterations`` times: each prototype's
    mass to ``1/P``, each sample's mass to ``1/N``; finally rows scaled by ``N``. No gradient (the
    official code detaches the similarities). Equivariant to permuting the samples (rows permute)."""
    with torch.no_grad():
        q = torch.exp((z.detach() @ prototypes.detach().T) / epsilon).T  # [P, N]
        num_prototypes, n = q.shape
        q = q / q.sum()
        for _ in range(iterations):
            q = F.normalize(q, p=1, dim=1) / num_prototypes
            q = F.normalize(q, p=1, dim=0) / n
        return (q * n).T


def topk_mask(weights: Tensor, k: int) -> Tensor:
    """``[N, P]`` 0/1 mask of the ``k`` largest entries of each row of ``weights`` (``k <= 0``: all ones)."""
    if k <= 0:
        return torch.ones_like(weights)
    index = weights.topk(min(k, weights.shape[1]), dim=1).indices
    return torch.zeros_like(weights).scatter_(1, index, 1.0)


def class_mask(labels: Tensor, proto_labels: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[N, P]``: 1 where prototype ``p`` belongs to sample ``i``'s class (the unlabelled variant uses
    an all-ones mask instead)."""
    return (labels.reshape(-1, 1) == proto_labels.reshape(1, -1)).to(dtype)


def assignment_weights(q: Tensor, mask: Tensor, top_k: int) -> Tensor:
    """Step 2: the EMA weights ``W`` [N, P] from the Sinkhorn assignment ``q`` and the class ``mask``:
    ``mask * q`` restricted to each row's ``top_k`` largest, L1-normalised per sample (row) and then per
    prototype (column). A column no sample reaches stays all zero."""
    masked = mask * q
    masked = topk_mask(masked, top_k) * masked
    return F.normalize(F.normalize(masked, p=1, dim=1), p=1, dim=0)


def ema_update(prototypes: Tensor, z: Tensor, weights: Tensor, momentum: float) -> Tensor:
    """Step 3: ``normalize(momentum * mu + (1 - momentum) * W^T z)`` for every prototype with assigned
    mass; prototypes whose column of ``weights`` is all zero keep their exact value (the official code
    computes ``normalize(momentum * mu)``, the same vector up to rounding).

    Differentiable in ``z`` (the official gradient path of the prototype-contrastive loss); ``prototypes``
    and ``weights`` are treated as constants."""
    target = weights.T @ z  # [P, D]
    updated = F.normalize(momentum * prototypes.detach() + (1.0 - momentum) * target, p=2, dim=1)
    assigned = weights.sum(dim=0) > 0
    return torch.where(assigned[:, None], updated, prototypes.detach().to(updated.dtype))


def loss_weights(q_updated: Tensor, mask: Tensor, ema_weights: Tensor, top_k: int) -> Tensor:
    """Step 4: ``w`` [N, P], rows summing to 1: ``mask * q_updated`` at the ``top_k`` positions of each
    row of ``ema_weights`` (step 2's matrix after its per-prototype normalisation, as the official code
    re-selects them there), L1-normalised per sample."""
    return F.normalize(topk_mask(ema_weights, top_k) * mask * q_updated, p=1, dim=1)


def mle_loss(z: Tensor, prototypes: Tensor, weights: Tensor, temperature: float = 0.1) -> Tensor:
    """Per-sample ``-sum_p w_ip log softmax_p(z_i . mu_p / temperature)`` [N]; the softmax runs over ALL
    prototypes. ``prototypes`` and ``weights`` are detached (gradients reach ``z`` only)."""
    logits = z @ prototypes.detach().T / temperature
    return -(weights.detach() * logits.log_softmax(dim=1)).sum(dim=1)


def prototype_contrastive_loss(prototypes: Tensor, proto_labels: Tensor | None, temperature: float = 0.5) -> Tensor:
    """Step 6: ``-mean_p [mean_{q in pos(p)} mu_p.mu_q/t - log sum_{q != p} exp(mu_p.mu_q/t)]``.

    ``pos(p)``: the other prototypes of ``p``'s class. ``proto_labels=None`` (the unlabelled variant,
    our reading): no positives, every prototype is only repelled from all others. With one prototype per
    class the official value is shifted by its (detached) per-row maximum; the gradient is the same."""
    p = F.normalize(prototypes, dim=1)
    logits = p @ p.T / temperature
    n = len(p)
    not_self = ~torch.eye(n, dtype=torch.bool, device=p.device)
    negatives = torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1)
    if proto_labels is None:
        return negatives.mean()
    positive = (proto_labels[:, None] == proto_labels[None, :]) & not_self
    weights = F.normalize(positive.to(logits.dtype), p=1, dim=1)
    return -((weights * logits).sum(dim=1) - negatives).mean()
