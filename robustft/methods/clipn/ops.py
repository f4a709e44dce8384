"""CLIPN's pure functions: the three loss terms and the hand-crafted variant's template negation.

Kept apart from :mod:`robustft.methods.clipn` (the LightningModule) so that they can be tested against naive
loops without building a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TSO_EPS", "clipn_losses", "negate_templates"]

#: the ``1e-4`` inside the square root of the official L2 text semantic-opposite loss
TSO_EPS = 1e-4


def clipn_losses(
    image: Tensor, yes: Tensor, no: Tensor, scale: Tensor | float, match_ids: Tensor | None = None
) -> dict[str, Tensor]:
    """CLIPN's three loss terms, each weighted by 0.5 (their sum is the official total).

    Args:
        image, yes, no: ``[N, E]`` L2-normalised image, yes-text and no-text embeddings of N pairs
            (row i of each belongs to pair i).
        scale: the frozen ``exp(logit_scale)``.
        match_ids: ``[N]`` optional ids (class labels): pairs (i, j) with equal ids are left out of
            ``L_no`` (our CHOICE for class-name captions, where another image's caption of the same class
            is no negative); ``None`` (official): every off-diagonal pair counts as "no".

    Returns ``{"itbo_yes": 0.5 L_yes, "itbo_no": 0.5 L_no, "tso": 0.5 L_tso}``. ``log p`` is computed as
    ``-softplus(·)`` of the logit difference (stable for any scale).
    """
    n = image.shape[0]
    if n < 2:
        raise ValueError(
            f"CLIPN's L_no needs unmatched pairs, i.e. a (global) batch of at least 2 samples, got {n}; raise "
            "data.batch_size (or turn on model.init_args.gather_distributed under DDP)"
        )
    yes_logits = scale * image @ yes.T  # [N, N]: image i vs caption j
    no_logits = scale * image @ no.T
    diff = yes_logits - no_logits
    log_p_yes = -F.softplus(-diff)  # log sigmoid(diff)
    log_p_no = -F.softplus(diff)
    unmatched = ~torch.eye(n, dtype=torch.bool, device=image.device)
    if match_ids is not None:
        match_ids = match_ids.to(image.device)
        unmatched &= match_ids[:, None] != match_ids[None, :]
    l_yes = -log_p_yes.diagonal().mean()
    # no unmatched pair at all (one class in the whole batch): a zero that keeps the graph
    l_no = -log_p_no[unmatched].mean() if bool(unmatched.any()) else log_p_no.sum() * 0.0
    l_tso = (2.0 - torch.sqrt(2.0 - 2.0 * (yes * no).sum(dim=-1) + TSO_EPS)).mean()
    return {"itbo_yes": 0.5 * l_yes, "itbo_no": 0.5 * l_no, "tso": 0.5 * l_tso}


def negate_templates(templates: list[str]) -> list[str]:
    """Default no-templates of the hand-crafted variant: ``" of a "`` / ``" of the "`` -> ``" of no "``."""
    out = []
    for t in templates:
        negated = t.replace(" of a ", " of no ", 1) if " of a " in t else t.replace(" of the ", " of no ", 1)
        if negated == t:
            raise ValueError(
                f"model.no_templates: cannot derive a 'no' template from {t!r} (no ' of a ' / ' of the '); give "
                "model.init_args.no_templates, one per template, e.g. 'a photo of no {}.'"
            )
        out.append(negated)
    return out
