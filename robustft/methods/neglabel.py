"""NegLabel negative mining moved to the CLIP layer, :mod:`robustft.backbones.clip.neglabel`, so that
any CLIP method can use it; these names are re-exported from there."""

from robustft.backbones.clip.neglabel import (  # noqa: F401
    ANY_KIND,
    DEFAULT_CANDIDATES,
    Candidates,
    label_features,
    mine_negative_labels,
    read_candidates,
)

__all__ = [
    "ANY_KIND",
    "DEFAULT_CANDIDATES",
    "Candidates",
    "label_features",
    "mine_negative_labels",
    "read_candidates",
]
