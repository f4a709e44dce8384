"""Zero-shot CLIP OOD scores: MCM, GL-MCM and NegLabel (pure tensor code, higher = more ID).

They read the cosine similarities a CLIP method's ``forward_eval`` returns instead of logits:

* ``cosine`` ``[B, K]``: raw cosines between each (L2-normalised) image embedding and the K ID class
  text embeddings;
* ``local_cosine`` ``[B, P, K]``: the same for the P per-patch (MaskCLIP-style local) image embeddings
  (GL-MCM);
* ``neg_cosine`` ``[B, N]``: cosines to N mined negative label text embeddings (NegLabel).

==========  ======================  ==========================================================
name        class                   score
==========  ======================  ==========================================================
mcm         :class:`MCMScore`       ``max_k softmax_k(cos / T)`` (Ming et al., NeurIPS 2022)
glmcm       :class:`GLMCMScore`     MCM + ``λ · max_{r,k} softmax_k(local_cos_r / T)`` (Miyai et al. 2023)
neglabel    :class:`NegLabelScore`  ID probability mass of ``softmax([cos ; neg_cos] / τ)`` (Jiang et al. 2024)
==========  ======================  ==========================================================

Importing :mod:`robustft.ood` registers them in :data:`robustft.ood.scores.SCORES`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from robustft.ood.scores import SCORES, OODScore, _floating, _result

__all__ = ["GLMCMScore", "MCMScore", "NegLabelScore", "glmcm", "mcm", "neglabel"]


def _matrix(outputs: Mapping[str, Tensor], key: str, ndim: int) -> Tensor:
    x = _floating(outputs[key])
    if x.ndim != ndim:
        shape = "[B, K]" if ndim == 2 else "[B, P, K]"
        raise ValueError(f"'{key}' must be a {shape} tensor, got shape {tuple(x.shape)}")
    return x


def mcm(cosine: Tensor, temperature: float = 1.0) -> Tensor:
    """``max_k softmax_k(cosine / T)`` over the last dimension (class axis)."""
    return (cosine / temperature).softmax(dim=-1).amax(dim=-1)


def glmcm(cosine: Tensor, local_cosine: Tensor, temperature: float = 1.0, lambda_local: float = 1.0) -> Tensor:
    """``mcm(cosine) + λ · max_{r,k} softmax_k(local_cosine[:, r] / T)``."""
    local = (local_cosine / temperature).softmax(dim=-1).amax(dim=-1)  # [B, P]
    return mcm(cosine, temperature) + lambda_local * local.amax(dim=-1)


def neglabel(
    cosine: Tensor,
    neg_cosine: Tensor,
    temperature: float = 0.01,
    ngroup: int = 1,
    permutation: Tensor | None = None,
) -> Tensor:
    """NegLabel score: probability mass on the ID labels of ``softmax([cosine ; neg_cosine] / τ)``.

    With ``ngroup > 1`` the negatives are reordered by ``permutation`` (default: identity), the last
    ``N mod ngroup`` of them are dropped, the rest split into ``ngroup`` equal groups, the score is
    computed against each group (ID labels + that group only) and averaged. Computed as
    ``sigmoid(logsumexp(ID / τ) - logsumexp(neg / τ))`` in float64 (the same value as the softmax sum,
    without overflow); with no negatives the score is exactly 1.
    """
    b, n = neg_cosine.shape
    if n == 0:
        return torch.ones(b, dtype=cosine.dtype, device=cosine.device)
    x = cosine.double() / temperature
    neg = neg_cosine.double() / temperature
    groups = max(1, min(int(ngroup), n))
    if groups > 1:
        if permutation is not None:
            neg = neg[:, permutation.to(neg.device)]
        size = n // groups
        neg = neg[:, : groups * size].reshape(b, groups, size)
    else:
        neg = neg.unsqueeze(1)  # [B, 1, N]
    id_lse = torch.logsumexp(x, dim=-1, keepdim=True)  # [B, 1]
    neg_lse = torch.logsumexp(neg, dim=-1)  # [B, G]
    return torch.sigmoid(id_lse - neg_lse).mean(dim=-1)


@SCORES.register("mcm")
class MCMScore(OODScore):
    """Maximum Concept Matching (Ming et al., NeurIPS 2022): ``max_k softmax_k(cos(f(x), t_k) / T)``.

    Reads the raw cosines ``cosine`` [B, K] (not ``logit_scale``-scaled logits). Default ``T = 1``
    (official ``--T``): with cosines in [-1, 1] the values sit just above 1/K; only the ranking
    matters. In [1/K, 1] and invariant to the order of the classes.
    """

    name = "mcm"
    requires = frozenset({"cosine"})

    def __init__(self, *, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"MCM temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        cosine = _matrix(outputs, "cosine", 2)
        return _result(mcm(cosine, self.temperature), cosine)


@SCORES.register("glmcm")
class GLMCMScore(OODScore):
    """Global-Local MCM (Miyai et al. 2023): ``MCM(global) + λ · max_{r,k} softmax_k(cos(f_r, t_k) / T)``.

    ``f_r`` are the per-patch local embeddings (``local_cosine`` [B, P, K], MaskCLIP value path of
    the last vision block, see ``robustft.backbones.clip.vit_global_and_local``). Defaults ``T = 1`` and
    ``lambda_local = 1.0`` (official ``--lambda_local`` default); the official ImageNet script uses
    ``0.5``. Grid ``lambda_local in [0.5, 1.0]`` (the two official values). ``lambda_local = 0`` is MCM.
    """

    name = "glmcm"
    requires = frozenset({"cosine", "local_cosine"})
    search_space = {"lambda_local": [0.5, 1.0]}

    def __init__(self, *, temperature: float = 1.0, lambda_local: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"GL-MCM temperature must be > 0, got {temperature}")
        if lambda_local < 0:
            raise ValueError(f"GL-MCM lambda_local must be >= 0, got {lambda_local}")
        self.temperature = float(temperature)
        self.lambda_local = float(lambda_local)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        cosine = _matrix(outputs, "cosine", 2)
        local = _matrix(outputs, "local_cosine", 3)
        if local.shape[0] != cosine.shape[0] or local.shape[2] != cosine.shape[1]:
            raise ValueError(
                f"'local_cosine' {tuple(local.shape)} does not match 'cosine' {tuple(cosine.shape)} ([B, P, K] vs [B, K])"
            )
        return _result(glmcm(cosine, local, self.temperature, self.lambda_local), cosine)


@SCORES.register("neglabel")
class NegLabelScore(OODScore):
    """NegLabel (Jiang et al., ICLR 2024): ``Σ_{k∈ID} softmax([cos_ID ; cos_neg] / τ)_k``.

    Reads ``cosine`` [B, K] (ID labels) and ``neg_cosine`` [B, N] (mined negative labels, see
    ``robustft.methods.neglabel``). In (0, 1] (up to float underflow for images far closer to a
    negative than to every ID label); exactly 1 when there are no negatives.

    Defaults: ``temperature = 0.01`` (official: logits ``100 · cos``); ``ngroup = 1`` (**our choice**,
    no grouping, as CMA's inference). The official NegLabel default is ``ngroup = 100`` for its
    ~10,000 WordNet negatives, i.e. ~100 negatives per group; our bundled pool mines ~650 negatives,
    for which 100 groups would leave ~6 per group, so set ``ngroup`` explicitly to reproduce the
    official protocol with a full-size pool. Grouping: the negatives are permuted with a fixed seed
    (``seed = 0``, ``torch.randperm`` with a CPU generator; the same permutation for every batch),
    the remainder ``N mod ngroup`` is dropped, and the per-group scores are averaged. With
    ``ngroup > N`` each negative forms its own group (``ngroup`` is clipped to N).
    """

    name = "neglabel"
    requires = frozenset({"cosine", "neg_cosine"})

    def __init__(self, *, temperature: float = 0.01, ngroup: int = 1, seed: int = 0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"NegLabel temperature must be > 0, got {temperature}")
        if int(ngroup) < 1:
            raise ValueError(f"NegLabel ngroup must be >= 1, got {ngroup}")
        self.temperature = float(temperature)
        self.ngroup = int(ngroup)
        self.seed = int(seed)
        self._permutations: dict[int, Tensor] = {}

    def permutation(self, n: int) -> Tensor:
        """The fixed grouping permutation of ``n`` negatives (cached; identical across batches)."""
        if n not in self._permutations:
            self._permutations[n] = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return self._permutations[n]

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        cosine = _matrix(outputs, "cosine", 2)
        neg = _matrix(outputs, "neg_cosine", 2)
        if neg.shape[0] != cosine.shape[0]:
            raise ValueError(f"'neg_cosine' has {neg.shape[0]} rows but 'cosine' has {cosine.shape[0]}")
        n = neg.shape[1]
        perm = self.permutation(n) if self.ngroup > 1 and n > 1 else None
        return _result(neglabel(cosine, neg, self.temperature, self.ngroup, perm), cosine)
