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

Mining needs only a ``CLIPBackbone``, so it lives in the CLIP layer: any CLIP method composes a
:class:`NegativeLabels` (mined words + cached embeddings + checkpoint state), or calls
:func:`mine_negative_labels` directly (``robustft.methods.neglabel`` re-exports these names).
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
    "NegativeLabels",
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


class NegativeLabels:
    """NegLabel's negative labels as a component any CLIP method composes (zero-shot, fine-tuned, CLIPN).

    It holds what the mining produced and what it costs to recompute: the mined words (mined once, on
    first use, from the configured candidate pool with the current weights) and their text embeddings
    (re-encoded only when the backbone's text tower changed, which ``CLIPBackbone.text_classifier``
    detects). The words are the component's state: :meth:`state_dict` / :meth:`load_state_dict` put them
    in a method's checkpoint, so evaluating a checkpoint uses the negatives it was evaluated with.

    Args:
        candidates: candidate word file (``word`` or ``word<TAB>noun|adj`` lines); ``None``: the bundled pool.
        kind_templates: templates per candidate kind (``noun``, ``adj``, ``any``); kinds not listed use
            the first ID template (official NegLabel: ``{noun: ["the nice {}"], adj: ["this is a {} photo"]}``).
        eta, topk: NegMining quantile η and kept fraction (0.95 and 0.15, as the official code).
    """

    def __init__(
        self,
        candidates: str | os.PathLike[str] | None = None,
        kind_templates: Mapping[str, Sequence[str]] | None = None,
        eta: float = 0.95,
        topk: float = 0.15,
    ) -> None:
        self.candidates = candidates
        self.kind_templates = {str(k): list(v) for k, v in (kind_templates or {}).items()}
        self.eta = eta
        self.topk = topk
        self.words: Candidates | None = None
        self._encoded: tuple[tuple[Tensor, ...], Tensor] | None = None

    def templates_for(self, kind: str, id_templates: Sequence[str]) -> list[str]:
        return self.kind_templates.get(kind, list(id_templates[:1]))

    def mine(self, backbone: CLIPBackbone, class_names: Sequence[str], id_templates: Sequence[str]) -> Candidates:
        """(Re-)run NegMining with the backbone's current weights and keep the result."""
        kinds = {k: self.templates_for(k, id_templates) for k in ("noun", "adj", ANY_KIND, *self.kind_templates)}
        self.words = mine_negative_labels(
            backbone, class_names, self.candidates, id_templates, kinds, eta=self.eta, neg_topk=self.topk
        )
        self._encoded = None
        log.info("NegLabel: mined %s negative labels", ", ".join(f"{len(v)} {k}" for k, v in self.words.items()))
        return self.words

    def labels(self, backbone: CLIPBackbone, class_names: Sequence[str], id_templates: Sequence[str]) -> Candidates:
        """The mined words ``{kind: [words]}``, mined on first use."""
        if self.words is None:
            self.mine(backbone, class_names, id_templates)
        assert self.words is not None
        return self.words

    def __len__(self) -> int:
        return sum(len(v) for v in (self.words or {}).values())

    def text_features(
        self, backbone: CLIPBackbone, class_names: Sequence[str], id_templates: Sequence[str]
    ) -> Tensor:
        """``[N, E]`` embeddings of the negative labels (kinds concatenated in mining order)."""
        parts = tuple(
            backbone.text_classifier(words, self.templates_for(kind, id_templates))
            for kind, words in self.labels(backbone, class_names, id_templates).items()
            if words
        )
        cached = self._encoded
        if cached is None or len(cached[0]) != len(parts) or any(a is not b for a, b in zip(cached[0], parts, strict=True)):
            joined = torch.cat(parts) if parts else backbone.text_classifier(list(class_names), id_templates)[:0]
            self._encoded = (parts, joined)
        return self._encoded[1]

    def state_dict(self) -> dict[str, Candidates | None]:
        return {"negative_labels": None if self.words is None else {k: list(v) for k, v in self.words.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        words = state.get("negative_labels")
        if words is not None:
            self.words = {str(k): list(v) for k, v in words.items()}  # type: ignore[union-attr]
            self._encoded = None
