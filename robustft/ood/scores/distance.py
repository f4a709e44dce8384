"""Feature-distance scores: KNN, MDS, RMDS (fitted on ID training features; no head).

Each reads the ``[N, D]`` output named by its ``feature_key`` (default ``"features"``), see
:class:`~robustft.ood.scores.base.FeatureScore`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from robustft.ood.scores.base import DEFAULT_FEATURE_KEY, SCORES, FeatureScore, Head, _dedupe, _result

__all__ = ["GlobalMahalanobisScore", "KNNScore", "MahalanobisScore", "RelativeMahalanobisScore"]


@SCORES.register("knn")
class KNNScore(FeatureScore):
    """Deep nearest neighbours (Sun et al., ICML 2022).

    Features are L2-normalised; ``score = -||z - z_(k)||`` where ``z_(k)`` is the k-th nearest
    normalised ID training feature. Default ``k=50`` (paper's CIFAR setting and OpenOOD ``knn.yml``);
    ``k`` above the bank size is capped at the bank size. Grid ``k in [1, 10, 20, 50, 100, 200, 500,
    1000]``, capped at the bank size.

    Exact search without faiss: the bank is scanned in chunks (``q @ bank_chunk.T`` then a running
    top-k of cosine similarities), so memory stays at about ``max_chunk_elements`` similarities per
    call; the distance to the selected neighbour is then recomputed exactly.
    """

    name = "knn"
    needs_fit = True
    reference_requires = frozenset({DEFAULT_FEATURE_KEY})
    search_space = {"k": [1, 10, 20, 50, 100, 200, 500, 1000]}
    #: similarities held at once (queries x bank rows); 2**24 float32 = 64 MiB
    max_chunk_elements: ClassVar[int] = 2**24

    def __init__(self, *, k: int = 50, feature_key: str = DEFAULT_FEATURE_KEY) -> None:
        super().__init__(feature_key=feature_key)
        if int(k) < 1:
            raise ValueError(f"KNN k must be >= 1, got {k}")
        self.k = int(k)

    @classmethod
    def search_grid(
        cls,
        reference: Mapping[str, Tensor] | None = None,
        head: Head | None = None,
        fixed: Mapping[str, Any] | None = None,
    ) -> dict[str, list]:
        grid = super().search_grid(reference, head, fixed)
        key = cls._grid_key(fixed)
        if reference is not None and key in reference:
            n = len(reference[key])
            grid["k"] = _dedupe(min(int(k), n) for k in grid["k"])
        return grid

    def _fit(self, reference: dict[str, Tensor], head: tuple[Tensor, Tensor] | None) -> None:
        bank = self.features(reference)
        if len(bank) == 0:
            raise ValueError("KNN needs at least one ID training feature")
        self.bank = F.normalize(bank, dim=1)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        raw = self.features(outputs)
        q = F.normalize(raw, dim=1)
        bank = self.bank.to(q.dtype)
        n, b = bank.shape[0], q.shape[0]
        k = min(self.k, n)
        if b == 0:
            return _result(q.new_zeros(0), raw)
        chunk = max(k, self.max_chunk_elements // b)
        best_sim: Tensor | None = None
        best_idx: Tensor | None = None
        for start in range(0, n, chunk):
            sims = q @ bank[start : start + chunk].T
            sim, idx = sims.topk(min(k, sims.shape[1]), dim=1)
            idx = idx + start
            if best_sim is not None and best_idx is not None:
                sim, idx = torch.cat([best_sim, sim], dim=1), torch.cat([best_idx, idx], dim=1)
                sim, pos = sim.topk(min(k, sim.shape[1]), dim=1)
                idx = idx.gather(1, pos)
            best_sim, best_idx = sim, idx
        assert best_idx is not None
        kth = bank[best_idx[:, k - 1]]
        return _result(-(q - kth).norm(dim=1), raw)


@SCORES.register("mds")
class MahalanobisScore(FeatureScore):
    """Class-conditional Mahalanobis score (Lee et al. 2018; the feature-only variant OpenOOD calls MDS).

    Fit: class means ``mu_c`` over the classes present in the training labels and one shared covariance
    ``Sigma = 1/N sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T`` (maximum likelihood, as
    ``sklearn.covariance.EmpiricalCovariance``), precision = ``pinv(Sigma)`` in float64.
    ``score = max_c -(x - mu_c)^T Sigma^+ (x - mu_c)``. No input pre-processing and no layer ensemble
    (OpenOOD ``mds`` defaults); no hyper-parameters besides ``feature_key``.
    """

    name = "mds"
    needs_fit = True
    reference_requires = frozenset({DEFAULT_FEATURE_KEY, "labels"})

    def _fit(self, reference: dict[str, Tensor], head: tuple[Tensor, Tensor] | None) -> None:
        feats = self.features(reference).double()
        labels = reference["labels"].reshape(-1).long().to(feats.device)
        if len(labels) != len(feats):
            raise ValueError(f"{len(feats)} reference features but {len(labels)} labels")
        if len(feats) == 0:
            raise ValueError(f"score '{self.name}' needs at least one ID training feature")
        classes, inverse, counts = labels.unique(return_inverse=True, return_counts=True)
        means = torch.zeros(len(classes), feats.shape[1], dtype=feats.dtype, device=feats.device)
        means.index_add_(0, inverse, feats)
        means /= counts[:, None].to(feats.dtype)
        centered = feats - means[inverse]
        self.classes = classes
        self.center = feats.mean(dim=0)  # quadratic forms are expanded around the global mean
        self.precision = torch.linalg.pinv(centered.T @ centered / len(feats), hermitian=True)
        self.class_offsets = means - self.center  # [C, D]
        self.class_norms = ((self.class_offsets @ self.precision) * self.class_offsets).sum(dim=1)

    def _class_distances(self, z: Tensor) -> Tensor:
        """Squared Mahalanobis distances ``[B, C]`` of ``z = x - center`` to every class mean."""
        zp = z @ self.precision
        return (zp * z).sum(dim=1, keepdim=True) - 2.0 * zp @ self.class_offsets.T + self.class_norms

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        raw = self.features(outputs)
        z = raw.double() - self.center
        return _result(-self._class_distances(z).amin(dim=1), raw)


@SCORES.register("rmds")
class RelativeMahalanobisScore(MahalanobisScore):
    """Relative Mahalanobis distance (Ren et al. 2021, "A simple fix to Mahalanobis distance ...").

    Adds a class-agnostic "background" Gaussian fitted on all training features (mean ``mu_0``,
    covariance ``Sigma_0``): ``score = max_c -(d_c(x) - d_0(x))`` with ``d`` the squared Mahalanobis
    distances, as in the paper and OpenOOD ``rmds``. No hyper-parameters besides ``feature_key``.
    """

    name = "rmds"

    def _fit(self, reference: dict[str, Tensor], head: tuple[Tensor, Tensor] | None) -> None:
        super()._fit(reference, head)
        z = self.features(reference).double() - self.center
        self.background_precision = torch.linalg.pinv(z.T @ z / len(z), hermitian=True)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        raw = self.features(outputs)
        z = raw.double() - self.center
        d0 = ((z @ self.background_precision) * z).sum(dim=1)
        return _result(d0 - self._class_distances(z).amin(dim=1), raw)


@SCORES.register("mahalanobis_global")
class GlobalMahalanobisScore(FeatureScore):
    """Single-Gaussian (class-agnostic) Mahalanobis score, PALM's evaluation (Lu et al., ICLR 2024;
    also CIDER / SSD with one cluster).

    Fit on the ID training features ``f``: ``x = f / ||f||`` (``normalize``), then each dimension
    standardised with the training mean ``m`` and (population) std ``s`` (``standardize``; a dimension
    with zero std is only centred), ``z = (x - m) / s``; ``Sigma = 1/N sum_i z_i z_i^T`` (maximum
    likelihood), precision ``pinv(Sigma)`` in float64. ``score = -z^T Sigma^+ z``: the features are
    centred **once**. The official PALM code subtracts the raw feature mean a second time from the
    already standardised features before the quadratic form (double centring); that quirk is not
    reproduced, so absolute numbers can differ from the paper's. Without ``standardize`` the score is
    ``-(x - m)^T pinv(cov(x)) (x - m)``.
    """

    name = "mahalanobis_global"
    needs_fit = True
    reference_requires = frozenset({DEFAULT_FEATURE_KEY})

    def __init__(
        self, *, normalize: bool = True, standardize: bool = True, feature_key: str = DEFAULT_FEATURE_KEY
    ) -> None:
        super().__init__(feature_key=feature_key)
        self.normalize = bool(normalize)
        self.standardize = bool(standardize)

    def _prepare(self, raw: Tensor) -> Tensor:
        x = raw.double()
        return F.normalize(x, dim=1) if self.normalize else x

    def _fit(self, reference: dict[str, Tensor], head: tuple[Tensor, Tensor] | None) -> None:
        x = self._prepare(self.features(reference))
        if len(x) == 0:
            raise ValueError(f"score '{self.name}' needs at least one ID training feature")
        self.center = x.mean(dim=0)
        std = x.std(dim=0, unbiased=False)
        self.scale = torch.where(std > 0, std, torch.ones_like(std)) if self.standardize else torch.ones_like(std)
        z = (x - self.center) / self.scale
        self.precision = torch.linalg.pinv(z.T @ z / len(z), hermitian=True)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        raw = self.features(outputs)
        z = (self._prepare(raw) - self.center) / self.scale
        return _result(-((z @ self.precision) * z).sum(dim=1), raw)
