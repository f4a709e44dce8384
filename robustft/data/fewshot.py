"""Few-shot training subsets: K images per class, chosen by a seed alone.

Rule (``data.shots_per_class: K``, ``data.shots_seed``): for each class c in id order, draw one seeded
permutation of the class's images (``numpy.random.default_rng(shots_seed)``, the classes in turn) and
keep its first K. So

- the shots depend only on the training set, ``shots_seed`` and K: every method, whatever its
  ``val_fraction`` / ``seed`` / batch size, trains on the same images;
- K-shot subsets of one seed are nested (the 1-shot image is among the 2 shots, ...), as a seeded
  per-class ranking should be;
- the validation split carved from ``data.train`` is drawn from the *other* images afterwards
  (:func:`split_after_shots`), so it never holds a shot.
"""

from __future__ import annotations

import numpy as np

from robustft.data.sources import DataConfigError


def few_shot_indices(
    labels: np.ndarray, shots: int, seed: int, class_names: list[str], where: str = "data.train"
) -> np.ndarray:
    """Sorted indices of ``shots`` images of every class (``labels`` are class ids 0..len(class_names)-1).

    Raises:
        DataConfigError: naming ``data.shots_per_class`` when a class has fewer than ``shots`` images.
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=len(class_names)) if len(labels) else np.zeros(len(class_names), int)
    smallest = int(np.argmin(counts))
    if shots > counts[smallest]:
        raise DataConfigError(
            f"data.shots_per_class: {shots} shots per class, but class {smallest} ('{class_names[smallest]}') "
            f"has only {int(counts[smallest])} images in {where}; set data.shots_per_class to at most "
            f"{int(counts[smallest])} (the smallest class), or use a larger training set"
        )
    rng = np.random.default_rng(seed)
    chosen = [np.flatnonzero(labels == c)[rng.permutation(int(counts[c]))[:shots]] for c in range(len(class_names))]
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


def split_after_shots(n: int, shots: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Sorted validation indices: ``round(n * val_fraction)`` (at least 1) of the ``n`` training images
    that are not shots, drawn with ``seed``; empty when ``val_fraction`` is 0."""
    if val_fraction == 0:
        return np.arange(0)
    rest = np.setdiff1d(np.arange(n), shots)
    n_val = min(len(rest), max(1, int(round(n * val_fraction))))
    return np.sort(rest[np.random.default_rng(seed).permutation(len(rest))[:n_val]])
