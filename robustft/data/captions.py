"""Captions of training images: the source's own (``batch["text"]``) or class names put in templates.

One function decides which template captions a labelled sample gets, so every method that pairs images
with text (FLYP / CMA, CLIPN, Local-Prompt, ...) draws them the same way:

- :func:`caption_codes` gives each sample the code ``label * T + t`` of its caption, ``t`` the template
  index (always 0 with one template, else drawn uniformly). Methods that tokenise the K x T captions
  once and encode only the distinct ones of a batch (``ContrastiveFinetune``) use the codes directly.
- :func:`captions_for` gives the caption strings themselves.
- :func:`batch_captions` gives a batch's captions: its ``text`` when the source has captions (npz
  ``texts``, webdataset ``.txt``), else :func:`captions_for` of its labels.

Without a ``generator`` the template draw is ``torch.randint(T, labels.shape, device=labels.device)`` on the
global RNG, exactly what ``ContrastiveFinetune.captions`` drew before it used this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def check_templates(templates: Sequence[str], field: str = "templates") -> list[str]:
    """``templates`` as a list, refusing an empty list or a template without exactly one ``{}``."""
    out = list(templates)
    if not out:
        raise ValueError(f"{field}: give at least one caption template such as 'a photo of a {{}}.'")
    bad = [t for t in out if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise ValueError(f"{field}: every template needs exactly one '{{}}' for the class name, got {bad[:3]}")
    return out


def caption_codes(labels: Tensor, n_templates: int, generator: torch.Generator | None = None) -> Tensor:
    """``[B]`` caption codes ``label * n_templates + template``; the template is drawn per sample.

    Args:
        labels: ``[B]`` class ids.
        n_templates: number of templates T (>= 1); with one template nothing is drawn.
        generator: RNG of the template draw (on the labels' device); ``None``: the global RNG.
    """
    if n_templates < 1:
        raise ValueError(f"n_templates must be >= 1, got {n_templates}")
    labels = torch.as_tensor(labels).long()
    if n_templates == 1:
        template = torch.zeros_like(labels)
    else:
        template = torch.randint(n_templates, labels.shape, device=labels.device, generator=generator)
    return labels * n_templates + template


def captions_for(
    labels: Tensor | Sequence[int],
    class_names: Sequence[str],
    templates: Sequence[str],
    generator: torch.Generator | None = None,
) -> list[str]:
    """One caption per label: ``templates[t].format(class_names[label])``, ``t`` drawn as in :func:`caption_codes`."""
    templates = check_templates(templates)
    labels = torch.as_tensor(labels).long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(class_names)):
        raise ValueError(
            f"captions_for: labels must lie in [0, {len(class_names)}) (one class name each), "
            f"got {int(labels.min())}..{int(labels.max())}"
        )
    codes = caption_codes(labels, len(templates), generator).tolist()
    n = len(templates)
    return [templates[code % n].format(class_names[code // n]) for code in codes]


def batch_captions(
    batch: Mapping[str, Any],
    class_names: Sequence[str],
    templates: Sequence[str],
    generator: torch.Generator | None = None,
) -> list[str]:
    """The captions of a training batch: its ``text`` (the source's captions) when it has one, else
    :func:`captions_for` of its ``label``."""
    text = batch.get("text")
    if text is not None:
        return list(text)
    return captions_for(batch["label"], class_names, templates, generator)
