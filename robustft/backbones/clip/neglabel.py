"""NegLabel negative mining (Jiang et al., ICLR 2024, ``XueJiang16/NegLabel``): pick, from a large pool of
candidate words, the labels whose text embeddings are *farthest* from every ID label.

For each candidate embedding ``c`` the similarities ``c · t_k`` to all K ID label embeddings are
reduced to their η-quantile (η = 0.95, official ``pencentile``); candidates are sorted by it, ascending,
and the lowest ``neg_topk`` fraction (0.15) is kept, separately for each kind of word (nouns and
adjectives in the official code). Each label embedding is the normalised mean of the normalised
embeddings of its templated texts (one template per kind officially: ``"the nice {}"`` for nouns and
ID labels, ``"this is a {} photo"`` for adjectives).

The bundled pool ``robustft/assets/neglabel_candidates.txt`` (3,845 WordNet nouns + 495 adjectives, see
its header and ``tools/make_neglabel_candidates.py``) is smaller than the official ~70k-word WordNet
pool, so it yields ~650 negatives instead of ~10,000.

Mining needs only a ``CLIPBackbone``, so it lives in the CLIP layer and any CLIP method can call
:func:`mine_negative_labels` (``robustft.methods.neglabel`` re-exports these names).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from robustft.backbones.clip.model import CLIPBackbone

__all__ = [
    "ANY_KIND",
    "DEFAULT_CANDIDATES",
    "Candidates",
    "label_features",
    "mine_negative_labels",
    "read_candidates",
]

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = Path(__file__).resolve().parents[2] / "assets" / "neglabel_candidates.txt"
#: kind of the words of a candidate list without a kind column
ANY_KIND = "any"
_KIND_ALIASES = {"n": "noun", "noun": "noun", "nouns": "noun", "a": "adj", "adj": "adj", "adjective": "adj",
                 "adjectives": "adj", "s": "adj"}

#: ``{kind: [words]}`` in a fixed order (nouns before adjectives as in the file)
Candidates = dict[str, list[str]]


def read_candidates(path: str | os.PathLike[str] | None = None) -> Candidates:
    """Read a candidate list: ``#`` comments, blank lines, then ``word`` or ``word<TAB>kind`` per line.

    ``kind`` is ``noun``/``adj`` (``n``/``a``/``adjective`` accepted) or anything else (kept verbatim);
    lines without one go into the pool ``'any'``. Words are stripped and deduplicated across the whole
    file (first occurrence wins). ``None`` reads the bundled default pool.
    """
    path = Path(DEFAULT_CANDIDATES if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(
            f"NegLabel candidate list '{path}' does not exist; give a text file with one word (optionally "
            "'word<TAB>noun|adj') per line, or leave neg_candidates unset for the bundled list"
        )
    pools: Candidates = {}
    seen: set[str] = set()
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, kind = line.partition("\t")
        word, kind = word.strip(), kind.strip().lower()
        if not word:
            raise ValueError(f"{path}:{number}: empty word")
        kind = _KIND_ALIASES.get(kind, kind) if kind else ANY_KIND
        if word.lower() in seen:
            continue
        seen.add(word.lower())
        pools.setdefault(kind, []).append(word)
    if not pools:
        raise ValueError(f"NegLabel candidate list '{path}' holds no words")
    return pools


def _as_pools(candidates: str | os.PathLike[str] | Mapping[str, Sequence[str]] | Sequence[str] | None) -> Candidates:
    if candidates is None or isinstance(candidates, str | os.PathLike):
        return read_candidates(candidates)
    if isinstance(candidates, Mapping):
        return {str(k): list(v) for k, v in candidates.items()}
    return {ANY_KIND: list(candidates)}


def _tokenize_fitting(backbone: CLIPBackbone, words: Sequence[str], templates: Sequence[str]) -> tuple[list[str], Tensor]:
    """``(words, tokens)`` for the words whose templated texts all fit the text context; the others are
    dropped with a warning. Tokens are ``[len(words) * len(templates), L]``, word-major."""
    try:
        return list(words), backbone.tokenize([t.format(w) for w in words for t in templates])
    except ValueError:
        pass
    kept, tokens = [], []
    for word in words:
        try:
            tokens.append(backbone.tokenize([t.format(word) for t in templates]))
        except ValueError:
            continue
        kept.append(word)
    log.warning(
        "NegLabel: %d of %d candidates do not fit the text context of %s and are skipped",
        len(words) - len(kept), len(words), backbone.model_name,
    )
    return kept, torch.cat(tokens) if tokens else torch.zeros(0, backbone.context_length, dtype=torch.long)


@torch.no_grad()
def label_features(
    backbone: CLIPBackbone,
    words: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 1024,
    tokens: Tensor | None = None,
) -> Tensor:
    """``[N, E]``: ``normalize(mean_t normalize(E_text(t.format(w))))`` without touching the backbone's cache
    (the candidate pool is large and encoded once; the cache is kept for the labels used every batch).
    ``tokens`` may hold the texts already tokenised (word-major)."""
    if not words:
        return torch.zeros(0, backbone.embed_dim, device=backbone.device)
    if tokens is None:
        tokens = backbone.tokenize([t.format(w) for w in words for t in templates])
    emb = torch.cat([backbone.encode_text(chunk, normalize=True) for chunk in tokens.split(batch_size)])
    return F.normalize(emb.float().view(len(words), len(templates), -1).mean(dim=1), dim=-1)


def _quantile_rows(sim: Tensor, q: float, chunk: int = 4096) -> Tensor:
    # torch.quantile refuses inputs above 2**24 elements; rows are independent, so go in chunks
    return torch.cat([torch.quantile(part, q, dim=1) for part in sim.split(chunk)])


@torch.no_grad()
def mine_negative_labels(
    backbone: CLIPBackbone,
    id_class_names: Sequence[str],
    candidates: str | os.PathLike[str] | Mapping[str, Sequence[str]] | Sequence[str] | None = None,
    templates: Sequence[str] = ("the nice {}",),
    kind_templates: Mapping[str, Sequence[str]] | None = None,
    eta: float = 0.95,
    neg_topk: float = 0.15,
    batch_size: int = 1024,
) -> Candidates:
    """NegMining: the candidates farthest from the ID labels, per kind, most distant first.

    Args:
        backbone: the CLIP model whose text tower embeds ID labels and candidates (its current weights;
            the official protocol mines with the *pretrained* model, once).
        id_class_names: the K ID labels.
        candidates: a candidate file (``None``: the bundled pool), ``{kind: words}`` or a flat word list.
        templates: templates of the ID labels (and of kinds absent from ``kind_templates``).
        kind_templates: templates per kind, e.g. ``{"noun": ["the nice {}"], "adj": ["this is a {} photo"]}``.
        eta: quantile of a candidate's similarities to the K ID labels that ranks it (0.95).
        neg_topk: fraction of each kind's pool kept (0.15).

    Candidates equal to an ID label (case-insensitive) are removed first; candidates whose templated
    text does not fit the context length are skipped. Returns ``{kind: [words]}``, each list sorted by
    increasing similarity to the ID labels (``int(neg_topk * n)`` words of a pool of n).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"NegLabel eta (quantile) must be in [0, 1], got {eta}")
    if not 0.0 < neg_topk <= 1.0:
        raise ValueError(f"NegLabel neg_topk must be in (0, 1], got {neg_topk}")
    if not id_class_names:
        raise ValueError("mine_negative_labels needs the ID class names")
    kind_templates = dict(kind_templates or {})
    was_training = backbone.training
    backbone.eval()
    try:
        id_features = label_features(backbone, list(id_class_names), list(templates), batch_size)
        id_lower = {name.lower() for name in id_class_names}
        mined: Candidates = {}
        for kind, words in _as_pools(candidates).items():
            kind_tpl = list(kind_templates.get(kind, templates))
            words = [w for w in dict.fromkeys(words) if w.lower() not in id_lower]
            n_keep = int(len(words) * neg_topk)
            if n_keep == 0:
                mined[kind] = []
                continue
            words, tokens = _tokenize_fitting(backbone, words, kind_tpl)
            n_keep = int(len(words) * neg_topk)
            feats = label_features(backbone, words, kind_tpl, batch_size, tokens)
            closeness = _quantile_rows(feats @ id_features.T, eta)
            order = torch.argsort(closeness, stable=True)[:n_keep].tolist()
            mined[kind] = [words[i] for i in order]
    finally:
        backbone.train(was_training)
    return mined
