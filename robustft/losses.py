"""Soft-target classification losses and the image-text contrastive loss used for fine-tuning.

BANG fine-tunes with label smoothing and/or Mixup to make the fine-tuned endpoint less over-confident
before weight averaging; both produce *soft* K-way targets, so the classification loss here is a
cross-entropy against a target distribution. FLYP/CMA fine-tune CLIP with a symmetric image-text
InfoNCE loss; CMA adds a regulariser that raises the log-partition of all image-text similarities.

Everything is a pure function of tensors (no modules, no Lightning) so methods can compose them and
tests can check the reductions to the standard losses.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["contrastive_loss", "mixup", "same_id_targets", "smooth_labels", "soft_cross_entropy"]


def soft_cross_entropy(logits: Tensor, targets_soft: Tensor) -> Tensor:
    """Cross-entropy against a target distribution, averaged over the batch.

    ``-mean_i Σ_c q_ic log softmax(z_i)_c`` for logits ``z`` and targets ``q`` of shape ``[B, K]``. With
    one-hot targets this is the ordinary cross-entropy; with smoothed or mixed targets it is the loss
    BANG fine-tunes with. Targets are not renormalised: pass distributions (rows summing to 1).
    """
    if logits.ndim != 2 or logits.shape != targets_soft.shape:
        raise ValueError(
            f"expected logits and soft targets of the same shape [B, K], got {tuple(logits.shape)} and "
            f"{tuple(targets_soft.shape)}; integer labels must first go through smooth_labels()"
        )
    return -(targets_soft * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def smooth_labels(
    labels: Tensor, num_classes: int, epsilon: float, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Label smoothing targets ``(1 - ε) * onehot(y) + ε / K`` (ε = 0 gives exact one-hot vectors).

    This is the same target distribution ``F.cross_entropy(..., label_smoothing=ε)`` uses implicitly;
    it is materialised here because Mixup has to mix the targets afterwards.
    """
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"label smoothing epsilon must lie in [0, 1], got {epsilon}")
    one_hot = F.one_hot(labels.long(), num_classes).to(dtype)
    if epsilon == 0.0:
        return one_hot
    return one_hot * (1.0 - epsilon) + epsilon / num_classes


def _sample_beta(alpha: float, generator: torch.Generator | None) -> float:
    """Draw λ ~ Beta(α, α) reproducibly from ``generator`` (or the global torch RNG).

    ``torch.distributions.Beta`` cannot take a generator, so one 63-bit seed is drawn from the torch
    RNG and a private ``random.Random`` samples the Beta variate; seeding torch therefore fixes λ.
    """
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator, device=_rng_device(generator)))
    return random.Random(seed).betavariate(alpha, alpha)


def _rng_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def mixup(
    images: Tensor, soft_targets: Tensor, alpha: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, float]:
    """Mixup (Zhang et al., 2018): convex combinations of the batch with a permutation of itself.

    ``λ ~ Beta(α, α)``; ``x̃ = λ x + (1 - λ) x[π]`` and ``q̃ = λ q + (1 - λ) q[π]`` for a random
    permutation ``π`` of the batch, one λ per batch. ``alpha <= 0`` disables mixing and returns the
    inputs themselves with ``λ = 1``, so a disabled Mixup cannot change a run.

    Args:
        images: ``[B, ...]`` floating batch (already normalised; pixels are mixed as given).
        soft_targets: ``[B, K]`` target distributions, e.g. from :func:`smooth_labels`.
        alpha: Beta concentration; common values 0.2-1.0.
        generator: optional RNG for λ and π; defaults to the global torch RNG.

    Returns:
        ``(mixed_images, mixed_targets, lam)``; mixed targets still sum to 1 per row.
    """
    if soft_targets.ndim != 2 or not soft_targets.is_floating_point():
        raise TypeError(
            f"mixup needs float soft targets [B, K], got {soft_targets.dtype} {tuple(soft_targets.shape)}; "
            "convert labels with smooth_labels(labels, num_classes, epsilon) (epsilon=0 for one-hot)"
        )
    if images.shape[0] != soft_targets.shape[0]:
        raise ValueError(f"batch sizes differ: images {images.shape[0]}, targets {soft_targets.shape[0]}")
    if not math.isfinite(alpha):
        raise ValueError(f"mixup alpha must be finite, got {alpha}")
    if alpha <= 0.0:
        return images, soft_targets, 1.0
    lam = _sample_beta(alpha, generator)
    perm = torch.randperm(images.shape[0], generator=generator, device=_rng_device(generator))
    perm = perm.to(images.device)
    mixed_images = lam * images + (1.0 - lam) * images[perm]
    mixed_targets = lam * soft_targets + (1.0 - lam) * soft_targets[perm.to(soft_targets.device)]
    return mixed_images, mixed_targets, lam


def alignment_regularizer(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float
) -> Tensor:
    """CMA's cross-modal alignment term ``R = ½(R_img + R_txt)`` with ``R_dir = -(1/B) Σ_k log Σ_j exp(z_kj)``
    over the logits ``z = s · î @ t̂ᵀ`` of each direction (features L2-normalised here).

    ``contrastive_loss(i, t, s, lam, ids) = contrastive_loss(i, t, s, 0, ids) + lam * alignment_regularizer(i, t, s)``
    (up to rounding), which is how :class:`~robustft.methods.ContrastiveFinetune` logs the two terms apart.
    """
    image = F.normalize(image_features, dim=-1)
    text = F.normalize(text_features, dim=-1)
    logits = logit_scale * image @ text.T
    return -0.5 * (torch.logsumexp(logits, dim=1).mean() + torch.logsumexp(logits, dim=0).mean())


def _scaled_infonce(logits: Tensor, targets: Tensor | None, lam: float) -> Tensor:
    """Row-wise InfoNCE with the log-partition scaled by ``1 - λ``.

    Per row k: ``-Σ_j t_kj z_kj + (1 - λ) log Σ_j exp(z_kj)`` with ``t`` the identity (matches on the
    diagonal) when ``targets`` is None, else a row-stochastic target matrix. Since ``Σ_j t_kj = 1`` this
    equals ``CE_k + λ R_k`` with ``R_k = -log Σ_j exp(z_kj)``; the extra ``-λ·logsumexp`` term pulls
    each embedding towards the softmax-weighted centroid of the other modality (CMA's modality-gap
    shrinking).
    """
    positive = logits.diagonal() if targets is None else (targets * logits).sum(dim=1)
    return (-positive + (1.0 - lam) * torch.logsumexp(logits, dim=1)).mean()


def same_id_targets(match_ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[B, B]`` row-stochastic targets spreading each row's mass uniformly over equal ``match_ids``.

    UniCL-style multi-positive targets (Yang et al., CVPR 2022): with class captions, two images of the
    same class both match either caption, so treating the other one as a negative (as plain CLIP does)
    fights the objective whenever a batch repeats a class, which is almost always with 10 classes.
    """
    same = (match_ids[:, None] == match_ids[None, :]).to(dtype)
    return same / same.sum(dim=1, keepdim=True)


def contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    lam: float = 0.0,
    match_ids: Tensor | None = None,
) -> Tensor:
    """Symmetric CLIP/FLYP InfoNCE with CMA's cross-modal alignment regulariser.

    ``L = ½(CE_img + λ R_img) + ½(CE_txt + λ R_txt)`` with logits ``z = s · î @ t̂ᵀ``, pairs on the
    diagonal (sample k's image matches text k; repeated classes in a batch give duplicate texts, which
    count as negatives exactly as in FLYP) and ``R = -(1/B) Σ_k log Σ_j exp(z_kj)`` per direction.

    Args:
        image_features: ``[B, D]`` image embeddings; L2-normalised here.
        text_features: ``[B, D]`` text embeddings of each sample's caption/prompt; L2-normalised here.
        logit_scale: the multiplicative temperature ``s`` (open_clip passes ``model.logit_scale.exp()``,
            not the log-parameter itself). A tensor keeps its gradient.
        lam: CMA regulariser weight λ ≥ 0 (paper: 0.001); 0 gives plain FLYP/CLIP.
        match_ids: optional ``[B]`` ids (e.g. class labels); pairs with equal ids are all positives
            (:func:`same_id_targets`) instead of the diagonal only. With all-distinct ids this is
            exactly the diagonal loss.

    ``λ = 0`` without ``match_ids`` is computed with ``F.cross_entropy`` so that plain FLYP is
    bit-identical to the standard CLIP loss; otherwise the equivalent (1 − λ)-scaled log-partition form
    is used. Under DDP pass globally gathered features (and ids) to match a single-device batch.
    """
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "image and text features must both be [B, D] with one text per image, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if not math.isfinite(lam) or lam < 0.0:
        raise ValueError(f"lam must be a finite non-negative weight, got {lam}")
    if match_ids is not None and match_ids.shape != image_features.shape[:1]:
        raise ValueError(f"match_ids must be [B]={image_features.shape[0]}, got {tuple(match_ids.shape)}")
    image = F.normalize(image_features, dim=-1)
    text = F.normalize(text_features, dim=-1)
    logits_per_image = logit_scale * image @ text.T
    logits_per_text = logits_per_image.T
    if match_ids is None:
        if lam == 0.0:
            targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
            return 0.5 * (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets))
        return 0.5 * (_scaled_infonce(logits_per_image, None, lam) + _scaled_infonce(logits_per_text, None, lam))
    # equal ids is a symmetric relation, so the same targets serve both directions
    targets = same_id_targets(match_ids.to(logits_per_image.device), logits_per_image.dtype)
    return 0.5 * (_scaled_infonce(logits_per_image, targets, lam) + _scaled_infonce(logits_per_text, targets, lam))
