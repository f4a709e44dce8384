"""The CLIP text side: :class:`TextTower`, one ``nn.Module`` owning an open_clip text transformer.

open_clip's ``CLIP`` copies the parts of its text tower (``token_embedding``, ``positional_embedding``,
``transformer``, ``ln_final``, ``text_projection``, ``attn_mask``) onto itself, next to the image tower,
so "the text tower" is not a module that can be copied, frozen or handed to an optimiser on its own.
:class:`TextTower` gathers those parts into one module. :meth:`TextTower.from_open_clip` *shares* them
with the model (a view: training the tower trains the model), and ``copy.deepcopy(tower)`` gives an
independent tower (CLIPN's "no" tower is a trained copy of the frozen "yes" tower). It encodes

* token ids (:meth:`~TextTower.encode_tokens`, equal to open_clip's ``encode_text``), and
* prompt embeddings (:meth:`~TextTower.encode_embeddings`: CoOp-style learnable context vectors, with
  or without a class name), pooled at given end-of-text positions.

Only open_clip's own text transformer is supported (Hugging Face towers differ entirely), without an
appended class token (CoCa) or a padding mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer
from torch import Tensor, nn

__all__ = [
    "TextTower",
    "causal_mask",
    "open_clip_text_module",
    "shrink_text_context",
    "text_context_length",
    "text_parameters",
]

_POOL_TYPES = ("argmax", "eos", "first", "last")


def open_clip_text_module(model: nn.Module) -> nn.Module:
    """The module holding ``token_embedding``/``positional_embedding``/... of an open_clip model.

    ``CLIP`` copies the text tower's parts onto itself; ``CustomTextCLIP``/``CoCa`` keep it in
    ``model.text``. Only open_clip's own ``TextTransformer`` is supported (HF towers differ entirely).
    """
    text = getattr(model, "text", None)
    if text is None:
        if not hasattr(model, "token_embedding"):
            raise NotImplementedError(f"{type(model).__name__} has no open_clip text tower")
        return model
    if not isinstance(text, TextTransformer):
        raise NotImplementedError(
            f"Text tower {type(text).__name__} is not open_clip's TextTransformer (e.g. a Hugging Face "
            "tower); prompt learning and context resizing only support open_clip's own text transformer."
        )
    return text


def text_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the text tower of an open_clip model (in a fixed order)."""
    tower = open_clip_text_module(model)
    if tower is not model:
        return list(tower.parameters())
    params: list[nn.Parameter] = []
    for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
        part = getattr(model, name, None)
        if isinstance(part, nn.Parameter):
            params.append(part)
        elif isinstance(part, nn.Module):
            params.extend(part.parameters())
    return params


def text_context_length(model: nn.Module) -> int:
    """Number of text positions of an open_clip model."""
    return int(open_clip_text_module(model).positional_embedding.shape[0])


def shrink_text_context(model: nn.Module, context_length: int) -> None:
    """Keep the first ``context_length`` text positions (positional embedding and causal mask).

    With a causal mask, a token only sees earlier positions, so for prompts that fit, the truncated
    model gives the same features as the full one (unlike open_clip's interpolation of the embedding).
    """
    tower = open_clip_text_module(model)
    if getattr(tower, "cls_emb", None) is not None:
        raise NotImplementedError("Changing the context length of a text tower with a class token")
    pos = tower.positional_embedding
    tower.positional_embedding = nn.Parameter(pos.detach()[:context_length].clone(), pos.requires_grad)
    mask_owner = model if tower is model else tower
    if getattr(mask_owner, "attn_mask", None) is not None:
        mask_owner.attn_mask = mask_owner.attn_mask[:context_length, :context_length].clone()
    for obj in {id(model): model, id(tower): tower}.values():
        if hasattr(obj, "context_length"):
            obj.context_length = context_length
        if hasattr(obj, "num_pos"):
            obj.num_pos = context_length


def causal_mask(
    length: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``[L, L]`` additive mask: ``-inf`` above the diagonal, 0 elsewhere (open_clip's causal mask)."""
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu_(1)


class TextTower(nn.Module):
    """An open_clip text transformer as one module: token ids or prompt embeddings -> text embeddings.

    Args:
        token_embedding: ``nn.Embedding`` of the vocabulary (``[V, W]``).
        positional_embedding: ``[L, W]`` parameter (L = context length).
        transformer: open_clip's ``Transformer`` (``forward(x, attn_mask)``, ``get_cast_dtype()``).
        ln_final: the final layer norm.
        text_projection: ``[W, E]`` parameter, an ``nn.Linear`` or ``None``.
        causal: whether tokens attend only to earlier positions (CLIP's text mask). The additive mask
            is built for each call on the tokens' device and dtype, so a tower that shares the parts
            of a model follows that model across ``.to()`` without holding a stale buffer.
        pool_type: which token is pooled: ``argmax`` (CLIP's EOT, the largest id), ``eos`` (first
            ``eos_id``), ``first`` or ``last``.
        eos_id: the end-of-text id for ``pool_type='eos'``.

    Registered sub-modules/parameters: ``token_embedding``, ``positional_embedding``, ``transformer``,
    ``ln_final``, ``text_projection`` (so ``state_dict`` keys are open_clip's CLIP keys). Build one from a
    model with :meth:`from_open_clip` (shared parameters) and ``copy.deepcopy`` it for an independent
    copy; the copy keeps ``requires_grad`` flags, call ``requires_grad_(True)`` to train it.
    """

    def __init__(
        self,
        token_embedding: nn.Embedding,
        positional_embedding: Tensor,
        transformer: nn.Module,
        ln_final: nn.Module,
        text_projection: Tensor | nn.Module | None,
        causal: bool = True,
        pool_type: str = "argmax",
        eos_id: int | None = None,
    ) -> None:
        super().__init__()
        if pool_type not in _POOL_TYPES:
            raise NotImplementedError(
                f"TextTower for text pool_type {pool_type!r} (supported: {_POOL_TYPES})"
            )
        if pool_type == "eos" and eos_id is None:
            raise ValueError("pool_type='eos' needs eos_id")
        self.token_embedding = token_embedding
        if isinstance(positional_embedding, nn.Parameter):
            self.positional_embedding = positional_embedding
        else:
            self.register_buffer("positional_embedding", positional_embedding)
        self.transformer = transformer
        self.ln_final = ln_final
        if text_projection is None or isinstance(text_projection, nn.Parameter | nn.Module):
            self.text_projection = text_projection
        else:
            self.register_buffer("text_projection", text_projection)
        self.causal = causal
        self.pool_type = pool_type
        self.eos_id = eos_id

    @classmethod
    def from_open_clip(cls, model: nn.Module) -> TextTower:
        """A tower *sharing* the text parts of an open_clip ``CLIP``/``CustomTextCLIP`` model (a view).

        The model's parameters are the tower's: training one trains the other. ``copy.deepcopy`` the
        result for an independent tower. Raises ``NotImplementedError`` for Hugging Face text towers,
        towers with an appended class token (CoCa) or a padding mask.
        """
        text = open_clip_text_module(model)
        if getattr(text, "cls_emb", None) is not None:
            raise NotImplementedError("TextTower for text towers with an appended class token (CoCa)")
        if getattr(text, "use_pad_mask", False):
            raise NotImplementedError("TextTower for text towers with a padding mask")
        mask = getattr(text, "attn_mask", None)
        if mask is not None and not torch.equal(mask, causal_mask(mask.shape[0], mask.device, mask.dtype)):
            raise NotImplementedError("TextTower for text towers whose attention mask is not causal")
        if text is model:
            pool, eos = model.text_pool_type, getattr(model, "text_eos_id", None)
        else:
            pool, eos = text.pool_type, getattr(text, "eos_id", None)
        return cls(
            text.token_embedding,
            text.positional_embedding,
            text.transformer,
            text.ln_final,
            text.text_projection,
            causal=mask is not None,
            pool_type=pool,
            eos_id=eos,
        )

    # ---- sizes -----------------------------------------------------------------------------------

    @property
    def width(self) -> int:
        """Width W of token embeddings (and of prompt context vectors)."""
        return int(self.positional_embedding.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.positional_embedding.shape[0])

    @property
    def output_dim(self) -> int:
        """Dimension E of the text embeddings."""
        proj = self.text_projection
        if proj is None:
            return self.width
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    # ---- encoding --------------------------------------------------------------------------------

    def pool_indices(self, tokens: Tensor) -> Tensor:
        """Index of the token whose feature is pooled (EOT for CLIP's BPE: the largest id)."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        fill = 0 if self.pool_type == "first" else tokens.shape[-1] - 1
        return torch.full(tokens.shape[:1], fill, dtype=torch.long, device=tokens.device)

    def embed_tokens(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(token_embedding(tokens) [N, L, W], eot_indices [N])``: inputs of :meth:`encode_embeddings`."""
        tokens = tokens.to(self.token_embedding.weight.device)
        return self.token_embedding(tokens), self.pool_indices(tokens)

    def encode_embeddings(self, embeddings: Tensor, eot_indices: Tensor, normalize: bool = False) -> Tensor:
        """Text embeddings ``[N, E]`` of token *embeddings* ``[N, L, W]`` (``L <= context_length``).

        Adds the first ``L`` positional embeddings, runs the transformer under the causal mask, applies
        ``ln_final``, takes the feature at ``eot_indices [N]`` and projects it. The embeddings may mix
        token embeddings and learnable vectors freely: ``[SOS] ctx_1..ctx_M name . [EOT]`` (CoOp) or
        ``[SOS] ctx_1..ctx_M . [EOT]`` (no class name), as long as ``eot_indices`` points at the EOT.
        """
        n, length, _ = embeddings.shape
        if length > self.context_length:
            raise ValueError(f"Prompt of {length} tokens exceeds the {self.context_length} text positions")
        cast = self.transformer.get_cast_dtype()
        x = embeddings.to(cast) + self.positional_embedding[:length].to(cast)
        mask = causal_mask(length, x.device, x.dtype) if self.causal else None
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(n, device=x.device), eot_indices.to(x.device)]
        proj = self.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Module) else x @ proj
        return F.normalize(x, dim=-1) if normalize else x

    def encode_tokens(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """Text embeddings ``[N, E]`` of token ids ``[N, L]``; equals open_clip's ``encode_text(tokens)``."""
        embeddings, eot = self.embed_tokens(tokens)
        return self.encode_embeddings(embeddings, eot, normalize=normalize)

    def forward(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        return self.encode_tokens(tokens, normalize=normalize)
