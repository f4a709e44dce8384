"""Local-Prompt (Zeng et al., ICLR 2025) as pure tensor code: view selection, losses, regional scores.

Kept apart from the LightningModule (:mod:`robustft.methods.local_prompt`) so that every formula can be
checked against a naive loop on hand-made tensors. Notation (``../shared/specs/methods-ood-detection.md``
section 2): for one view, ``a [B, R, K]`` are the logits ``s·cos(r_r, ℓ_c)`` of the R regional (local)
image features against the K class-specific local prompts, ``b [B, R, M]`` the same against the M
negative local prompts, ``s`` the CLIP logit scale and ``T`` the training temperature.

Importing this module registers two OOD scores (higher = more ID) in :data:`robustft.ood.scores.SCORES`:

==============  ==========================  ==================================================
name            class                       score
==============  ==========================  ==================================================
regional_mcm    :class:`RegionalMCMScore`   ``S_R``: mean of the top-k ``P_{r,c}`` (softmax over
                                            ID *and negative* local prompts, ID entries only)
local_prompt    :class:`LocalPromptScore`   ``S_G + λ·S_R`` with ``S_G`` the global MCM
==============  ==========================  ==================================================

Both read ``regional_topk`` ``[B, k_max]``: the largest ``P_{r,c}`` of each image in descending order,
which ``LocalPrompt.forward_eval`` computes (the softmax needs the negative prompts, which live in the
model). [CHOICE] Passing the k_max sorted values instead of the whole ``[B, R, K + M]`` map keeps the
collected evaluation outputs small (ImageNet: 196 regions x 1,300 prompts per image); any ``top_k``
up to k_max can then be scored.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from robustft.ood.clip_scores import mcm
from robustft.ood.scores import SCORES, OODScore, _floating, _result

__all__ = [
    "LocalPromptScore",
    "RegionalMCMScore",
    "diversity_loss",
    "local_aware_logits",
    "negative_local_loss",
    "positive_local_loss",
    "regional_probabilities",
    "regional_topk_values",
    "select_views",
    "topk_region_lse",
]


# --------------------------------------------------------------------------------------------------
# global-prompt-guided negative augmentation
# --------------------------------------------------------------------------------------------------


def select_views(similarity: Tensor, num_pos: int) -> tuple[Tensor, Tensor]:
    """Positive and negative views from ``similarity [B, V]`` = ``cos(z(v), t_y)`` (frozen global prompt).

    Returns ``(positives [num_pos, B], negative [1, B])``: per image, the indices of the ``num_pos``
    views most similar to the true class (most similar first) and of the single least similar view
    (the official code keeps only ``min_list[0]`` whatever ``--num_neg`` says).
    """
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be [B, V], got shape {tuple(similarity.shape)}")
    views = similarity.shape[1]
    if not 1 <= num_pos < views:
        raise ValueError(
            f"model.num_pos must be in [1, V-1] with V = {views} views per image (data.n_views); got {num_pos}"
        )
    positives = similarity.topk(num_pos, dim=1).indices.T.contiguous()
    negative = similarity.argmin(dim=1, keepdim=True).T.contiguous()
    return positives, negative


# --------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------


def _check_topk(k: int, regions: int) -> None:
    if not 1 <= k <= regions:
        raise ValueError(
            f"model.train_topk must be in [1, R] with R = {regions} regions per view (patches of the vision "
            f"tower); got {k}"
        )


def topk_region_lse(logits: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """``[B, J]``: ``log Σ_{r ∈ TopR_k(j)} exp(logits[:, r, j] / T)`` for every prompt j of ``logits [B, R, J]``.

    ``TopR_k(j)`` = the k regions with the largest logit for prompt j. ``logsumexp`` subtracts the
    maximum before ``exp`` (the official code's common factor), so the losses built from it are
    invariant to adding a constant to all logits.
    """
    _check_topk(k, logits.shape[1])
    return torch.logsumexp(logits.topk(k, dim=1).values / temperature, dim=1)


def positive_local_loss(a: Tensor, b: Tensor, labels: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """``L_pos = −mean_B log(num/den)`` on a positive view.

    ``num = Σ_{r∈TopR_k(y)} exp(a_{r,y}/T)``,
    ``den = Σ_c Σ_{r∈TopR_k(c)} exp(a_{r,c}/T) + Σ_m Σ_{r∈TopR_k(m)} exp(b_{r,m}/T)``.
    ``a [B, R, K]``, ``b [B, R, M]`` (M may be 0), ``labels [B]``.
    """
    lse_id = topk_region_lse(a, k, temperature)  # [B, K]
    log_num = lse_id.gather(1, labels.long().view(-1, 1)).squeeze(1)
    parts = [lse_id] if b.shape[-1] == 0 else [lse_id, topk_region_lse(b, k, temperature)]
    log_den = torch.logsumexp(torch.cat(parts, dim=1), dim=1)
    return (log_den - log_num).mean()


def negative_local_loss(a: Tensor, b: Tensor, labels: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """``L_neg = −mean_B log(num/den)`` on the negative view.

    ``R⁻`` = the k regions with the largest ``a_{r,y}`` (the regions that look most like the true
    class); ``num = Σ_{r∈R⁻} Σ_m exp(b_{r,m}/T)``, ``den = num + Σ_c Σ_{r∈TopR_k(c)} exp(a_{r,c}/T)``.
    Needs at least one negative prompt (``b [B, R, M≥1]``).
    """
    if b.shape[-1] == 0:
        raise ValueError("the negative local loss needs negative prompts (model.n_neg_prompts >= 1)")
    _check_topk(k, a.shape[1])
    y = labels.long()
    a_y = a.gather(2, y.view(-1, 1, 1).expand(-1, a.shape[1], 1)).squeeze(2)  # [B, R]
    regions = a_y.topk(k, dim=1).indices  # [B, k]
    b_sel = b.gather(1, regions.unsqueeze(-1).expand(-1, -1, b.shape[2]))  # [B, k, M]
    log_num = torch.logsumexp((b_sel / temperature).flatten(1), dim=1)
    lse_id = topk_region_lse(a, k, temperature)  # [B, K]
    log_den = torch.logsumexp(torch.cat([log_num.unsqueeze(1), lse_id], dim=1), dim=1)
    return (log_den - log_num).mean()


def diversity_loss(neg_features: Tensor) -> Tensor:
    """``L_div = Σ_{i,j} cos(n_i, n_j) / (M(M−1))`` over the M negative prompts (diagonal included).

    Computed on the *negative* prompts, as fixed upstream on 2025-03-20 (commit c785aba; earlier code
    used the class prompts). Identical prompts give ``M/(M−1)``; only the gradient matters.
    """
    m = neg_features.shape[0]
    if m < 2:
        raise ValueError(f"the diversity loss needs at least 2 negative prompts (model.n_neg_prompts), got {m}")
    n = F.normalize(neg_features, dim=-1)
    return (n @ n.T).sum() / (m * (m - 1))


# --------------------------------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------------------------------


def regional_probabilities(local_cosine: Tensor, neg_cosine: Tensor, temperature: float = 1.0) -> Tensor:
    """``P [B, R, K]``: ``exp(cos(r,ℓ_c)/T) / (Σ_c' exp(cos(r,ℓ_c')/T) + Σ_m exp(cos(r,n_m)/T))``, ID c only.

    ``local_cosine [B, R, K]``, ``neg_cosine [B, R, M]`` (M may be 0: then the plain local softmax).
    """
    both = torch.cat([local_cosine, neg_cosine], dim=-1) / temperature
    return both.softmax(dim=-1)[..., : local_cosine.shape[-1]]


def regional_topk_values(probabilities: Tensor, k: int) -> Tensor:
    """``[B, k]``: the k largest ``P_{r,c}`` over all (region, class) pairs, in descending order."""
    pairs = probabilities.flatten(1)
    if not 1 <= k <= pairs.shape[1]:
        raise ValueError(
            f"model.eval_top_k must be in [1, R*K] = [1, {pairs.shape[1]}] (regions x classes); got {k}"
        )
    return pairs.topk(k, dim=1).values


def local_aware_logits(cosine: Tensor, local_cosine: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """``[B, K]`` log of the local-aware classifier ``exp(cos(z,t_c)) · mean_{top-k r} exp(cos(r_r,ℓ_c)/T)``.

    ``k`` is clipped to the number of regions R (eval ``top_k`` counts (region, class) pairs, which can
    exceed R). The argmax is the paper's ID prediction.
    """
    k = min(k, local_cosine.shape[1])
    top = local_cosine.topk(k, dim=1).values / temperature  # [B, k, K]
    return cosine + torch.logsumexp(top, dim=1) - torch.log(torch.tensor(float(k), dtype=top.dtype))


# --------------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------------


def _regional(outputs: Mapping[str, Tensor], top_k: int | None, name: str) -> Tensor:
    values = _floating(outputs["regional_topk"])
    if values.ndim != 2:
        raise ValueError(f"'regional_topk' must be a [B, k] tensor, got shape {tuple(values.shape)}")
    if top_k is not None:
        if top_k > values.shape[1]:
            raise ValueError(
                f"score '{name}' top_k={top_k} exceeds the {values.shape[1]} regional values the method keeps; "
                f"raise model.init_args.eval_top_k to at least {top_k}"
            )
        values = values[:, :top_k]
    return values.mean(dim=1)


def _check_top_k(top_k: int | None, name: str) -> None:
    if top_k is not None and int(top_k) < 1:
        raise ValueError(f"score '{name}' top_k must be >= 1 (or null: all kept values), got {top_k}")


@SCORES.register("regional_mcm")
class RegionalMCMScore(OODScore):
    """Local-Prompt's regional score ``S_R``: mean of the top-k regional probabilities ``P_{r,c}``.

    Reads ``regional_topk`` [B, k_max] (descending; see the module docstring). ``top_k=None`` (default)
    averages all k_max values (the method's ``eval_top_k``, official 10). In (0, 1).
    """

    name = "regional_mcm"
    requires = frozenset({"regional_topk"})

    def __init__(self, *, top_k: int | None = None) -> None:
        super().__init__()
        _check_top_k(top_k, self.name)
        self.top_k = None if top_k is None else int(top_k)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        values = _regional(outputs, self.top_k, self.name)
        return _result(values, values)


@SCORES.register("local_prompt")
class LocalPromptScore(OODScore):
    """Local-Prompt's OOD score ``S = S_G + λ·S_R``: global MCM on ``cosine`` plus the regional score.

    ``temperature`` is the MCM temperature (official T = 1); ``lambda_regional`` = 1 is the paper's sum.
    """

    name = "local_prompt"
    requires = frozenset({"cosine", "regional_topk"})

    def __init__(self, *, temperature: float = 1.0, lambda_regional: float = 1.0, top_k: int | None = None) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"local_prompt temperature must be > 0, got {temperature}")
        if lambda_regional < 0:
            raise ValueError(f"local_prompt lambda_regional must be >= 0, got {lambda_regional}")
        _check_top_k(top_k, self.name)
        self.temperature = float(temperature)
        self.lambda_regional = float(lambda_regional)
        self.top_k = None if top_k is None else int(top_k)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        cosine = _floating(outputs["cosine"])
        regional = _regional(outputs, self.top_k, self.name)
        return _result(mcm(cosine, self.temperature) + self.lambda_regional * regional, cosine)
