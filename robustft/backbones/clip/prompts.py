"""Prompt learning on a :class:`~robustft.backbones.clip.text.TextTower`.

``PromptTextEncoder`` is CoOp's ``TextEncoder`` for open_clip: it feeds prompt *embeddings* through a
text tower (:meth:`TextTower.encode_embeddings`) and holds the tower by reference only, so its
``parameters()`` / ``state_dict()`` are empty. ``PromptLearner`` is CoOp on top of it: learnable
context vectors in front of a class name (``"[SOS] ctx_1..ctx_M {name}.[EOT]"``) or with no class name
at all (``"[SOS] ctx_1..ctx_M.[EOT]"``, Local-Prompt's negative prompts). Its parameters are ``ctx``
only; the LightningModule that owns the ``CLIPBackbone`` (or the tower) is responsible for its device
and checkpointing.
"""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch
from torch import Tensor, nn

from robustft.backbones.clip.model import CLIPBackbone
from robustft.backbones.clip.text import TextTower

__all__ = ["PromptLearner", "PromptTextEncoder"]


def _as_tower(source: nn.Module) -> TextTower:
    if isinstance(source, TextTower):
        return source
    if isinstance(source, CLIPBackbone):
        return source.text_tower
    return TextTower.from_open_clip(source)


class PromptTextEncoder(nn.Module):
    """Replays a text tower on token *embeddings* (CoOp's ``TextEncoder`` for open_clip).

    ``forward(prompt_embeddings [N, L, W], eot_indices [N])``: + positional embedding, transformer with
    the causal mask, ``ln_final``, pooling at ``eot_indices``, text projection
    (:meth:`TextTower.encode_embeddings`). Fed ``embed_tokens(tokens)`` it reproduces
    ``encode_text(tokens)``. ``source`` is a :class:`TextTower`, a ``CLIPBackbone`` (its
    ``text_tower``) or an open_clip model; the tower is held by reference, not registered: this module
    has no parameters of its own.
    """

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_tower", _as_tower(source))

    @property
    def tower(self) -> TextTower:
        return self._tower

    @property
    def width(self) -> int:
        return self._tower.width

    @property
    def pool_type(self) -> str:
        return self._tower.pool_type

    def pool_indices(self, tokens: Tensor) -> Tensor:
        """Index of the token whose feature is pooled (EOT for CLIP's BPE: the largest id)."""
        return self._tower.pool_indices(tokens)

    def embed_tokens(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(token_embedding(tokens) [N, L, W], eot_indices [N])``."""
        return self._tower.embed_tokens(tokens)

    def forward(self, prompt_embeddings: Tensor, eot_indices: Tensor, normalize: bool = True) -> Tensor:
        return self._tower.encode_embeddings(prompt_embeddings, eot_indices, normalize=normalize)


class PromptLearner(nn.Module):
    """CoOp: learnable context vectors in front of each class name, ``"[SOS] ctx_1..ctx_M {name}.[EOT]"``.

    Args:
        backbone: the ``CLIPBackbone`` (BPE ``SimpleTokenizer`` only). Held by reference; the learner
            never changes its ``requires_grad`` flags: freeze it yourself (``freeze(backbone)``) to
            train the context only.
        class_names: display names, used verbatim (no ``_`` -> space replacement). ``None``: prompts
            without a class name, ``"[SOS] ctx_1..ctx_M.[EOT]"`` (Local-Prompt's negative prompts);
            ``n_prompts`` gives their number.
        n_ctx: number of context tokens when ``ctx_init`` is None.
        ctx_init: initial context words (e.g. ``"a photo of a"``); then ``n_ctx`` is the number of BPE
            tokens of these words (CoOp behaviour) and ``ctx`` starts at their token embeddings.
        class_specific: one context per prompt (CoOp "CSC") instead of one shared context. Default:
            shared for class prompts, one per prompt for prompts without a class name (shared ones
            would all be the same prompt).
        n_prompts: number of prompts without a class name (only with ``class_names=None``).
        tower: the text tower that encodes the prompts (default: ``backbone.text_tower``), e.g. a
            trained copy of it. Also held by reference.

    Buffers (persistent, so a checkpoint restores them with ``ctx``): ``token_prefix`` ([K, 1, W] SOS
    embedding), ``token_suffix`` ([K, L-1-n_ctx, W] class name, '.', EOT, padding), ``tokenized_prompts``
    and ``eot_indices``. ``forward()`` returns the prompt text features ``[K, E]``.
    """

    def __init__(
        self,
        backbone: CLIPBackbone,
        class_names: Sequence[str] | None,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool | None = None,
        *,
        n_prompts: int | None = None,
        tower: TextTower | None = None,
    ) -> None:
        super().__init__()
        tok = backbone.tokenizer
        if not isinstance(tok, open_clip.SimpleTokenizer):
            raise NotImplementedError(
                f"PromptLearner needs open_clip's BPE SimpleTokenizer, got {type(tok).__name__}"
            )
        if class_names is None:
            if n_prompts is None or n_prompts < 1:
                raise ValueError(
                    f"prompts without a class name (class_names=None) need n_prompts >= 1, got {n_prompts}"
                )
            suffixes = ["."] * n_prompts
            class_specific = True if class_specific is None else class_specific
        else:
            if n_prompts is not None:
                raise ValueError("n_prompts is only for prompts without a class name (class_names=None)")
            class_names = list(class_names)
            if not class_names:
                raise ValueError("PromptLearner needs at least one class name")
            suffixes = [f" {name}." for name in class_names]
            class_specific = False if class_specific is None else class_specific
        encoder = PromptTextEncoder(backbone if tower is None else tower)
        if ctx_init is not None:
            ctx_text = " ".join(ctx_init.split())
            ctx_ids = tok.encode(ctx_text)
            if not ctx_ids:
                raise ValueError(f"ctx_init={ctx_init!r} has no tokens")
            n_ctx = len(ctx_ids)
        else:
            if n_ctx < 1:
                raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
            ctx_text = " ".join(["X"] * n_ctx)
            ctx_ids = tok.encode(ctx_text)
        tokens = backbone.tokenize([ctx_text + suffix for suffix in suffixes])
        expected = torch.tensor([tok.sot_token_id, *ctx_ids])
        if len(ctx_ids) != n_ctx or not (tokens[:, : 1 + n_ctx] == expected).all():
            raise NotImplementedError(
                "Tokenizer does not lay prompts out as [SOS] ctx... name; cannot split them"
            )

        embedding, eot = encoder.embed_tokens(tokens)
        embedding = embedding.detach().clone()
        self.register_buffer("tokenized_prompts", tokens.to(eot.device))
        self.register_buffer("eot_indices", eot)
        self.register_buffer("token_prefix", embedding[:, :1])
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :])

        if ctx_init is not None:
            ctx = embedding[0, 1 : 1 + n_ctx].clone()
            if class_specific:
                ctx = ctx.unsqueeze(0).repeat(len(suffixes), 1, 1)
        else:
            shape = (len(suffixes), n_ctx, encoder.width) if class_specific else (n_ctx, encoder.width)
            ctx = torch.empty(shape, dtype=embedding.dtype, device=embedding.device)
            nn.init.normal_(ctx, std=0.02)
        self.ctx = nn.Parameter(ctx)
        self.encoder = encoder  # no parameters of its own
        self.class_names = class_names
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.class_specific = class_specific

    @property
    def num_prompts(self) -> int:
        """K: the number of prompts (classes, or prompts without a class name)."""
        return int(self.tokenized_prompts.shape[0])

    def prompt_embeddings(self) -> Tensor:
        """``[K, L, W]``: prefix | ctx | suffix."""
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.num_prompts, -1, -1)
        return torch.cat([self.token_prefix, ctx.to(self.token_prefix.dtype), self.token_suffix], dim=1)

    def forward(self, normalize: bool = True) -> Tensor:
        return self.encoder(self.prompt_embeddings(), self.eot_indices, normalize=normalize)
