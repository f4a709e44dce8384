"""Image features of open_clip vision towers beyond the pooled embedding.

* :func:`visual_forward_intermediates`: block/stage outputs of any open_clip vision tower, following
  the :meth:`robustft.backbones.base.Backbone.forward_intermediates` contract: tokens ``[B, 1+N, D]``
  (class token, then patch tokens) of ViT blocks, ``[B, C, H, W]`` of ModifiedResNet stages
  (0 = stem, 1-4 = ``layer1``-``layer4``) and of timm trunks (``TimmModel``, timm's numbering).
* :func:`vit_global_and_local`: the global embedding and MaskCLIP-style per-patch embeddings in one
  pass of a ViT tower (GL-MCM, Local-Prompt), built on the same block runner.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from robustft.backbones.base import Indices, resolve_indices
from robustft.backbones.timm_backbone import timm_forward_intermediates, timm_num_intermediates

__all__ = ["visual_forward_intermediates", "visual_num_intermediates", "vit_global_and_local"]

_RESNET_LEVELS = ("stem", "layer1", "layer2", "layer3", "layer4")


# --------------------------------------------------------------------------------------------------
# Intermediate features
# --------------------------------------------------------------------------------------------------


def visual_num_intermediates(visual: nn.Module) -> int:
    """Number of feature levels of an open_clip vision tower (ViT blocks, ResNet stem + 4 stages, ...)."""
    if isinstance(visual, VisionTransformer):
        return len(visual.transformer.resblocks)
    if isinstance(visual, ModifiedResNet):
        return len(_RESNET_LEVELS)
    if isinstance(visual, TimmModel):
        return timm_num_intermediates(visual.trunk)
    raise NotImplementedError(
        f"Intermediate features of open_clip vision tower {type(visual).__name__} (supported: "
        "VisionTransformer, ModifiedResNet, TimmModel)"
    )


def _vit_blocks(
    visual: VisionTransformer, images: Tensor, take: list[int], last: int
) -> tuple[dict[int, Tensor], Tensor]:
    """Embed ``images`` and run blocks ``0..last`` (``last = -1``: none) as ``VisionTransformer.forward``.

    Returns the batch-first outputs of the blocks in ``take`` and the running tokens after block
    ``last`` in the transformer's own layout (sequence-first when ``batch_first`` is False).
    """
    tr = visual.transformer
    x = visual._embeds(images)
    if not tr.batch_first:
        x = x.transpose(0, 1).contiguous()
    use_ckpt = tr.grad_checkpointing and torch.is_grad_enabled()
    out: dict[int, Tensor] = {}
    for i, block in enumerate(tr.resblocks[: last + 1]):
        x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        if i in take:
            out[i] = x if tr.batch_first else x.transpose(0, 1)
    return out, x


def _resnet_levels(visual: ModifiedResNet) -> list[Callable[[Tensor], Tensor]]:
    return [getattr(visual, name) for name in _RESNET_LEVELS]


def visual_forward_intermediates(
    visual: nn.Module, images: Tensor, indices: Indices = None
) -> dict[int, Tensor]:
    """``{index: features}`` of an open_clip vision tower (see ``Backbone.forward_intermediates``).

    * ``VisionTransformer``: output of block ``i`` as tokens ``[B, 1+N, D]`` (class token first, then
      the N patch tokens), before ``ln_post``/pooling/projection: ``visual._pool(x)`` then
      ``@ visual.proj`` of the last block's tokens gives ``visual(images)``.
    * ``ModifiedResNet`` (CLIP RN50-style): 0 the stem, 1-4 ``layer1``-``layer4`` ``[B, C, H, W]``;
      ``visual.attnpool`` of level 4 gives ``visual(images)``.
    * ``TimmModel``: its timm trunk's ``forward_intermediates`` (timm's numbering and formats).
    """
    count = visual_num_intermediates(visual)
    what = "block" if isinstance(visual, VisionTransformer) else "stage"
    take = resolve_indices(count, indices, what)
    if isinstance(visual, VisionTransformer):
        return _vit_blocks(visual, images, take, take[-1])[0]
    if isinstance(visual, ModifiedResNet):
        out: dict[int, Tensor] = {}
        x = images
        for i, level in enumerate(_resnet_levels(visual)[: take[-1] + 1]):
            x = level(x)
            if i in take:
                out[i] = x
        return out
    return timm_forward_intermediates(visual.trunk, images, take)


# --------------------------------------------------------------------------------------------------
# Local (per-patch) image features
# --------------------------------------------------------------------------------------------------


def _value_path(block: nn.Module, x: Tensor) -> Tensor:
    """MaskCLIP value path of one residual block: attention replaced by each token's own value."""
    if isinstance(block, ResidualAttentionBlock):
        attn = block.attn  # nn.MultiheadAttention
        dim = attn.embed_dim
        w_v = attn.in_proj_weight[2 * dim :] if attn._qkv_same_embed_dim else attn.v_proj_weight
        b_v = attn.in_proj_bias[2 * dim :] if attn.in_proj_bias is not None else None
        v = attn.out_proj(F.linear(block.ln_1(x), w_v, b_v))
        y = x + block.ls_1(v)
    elif isinstance(block, CustomResidualAttentionBlock):
        attn = block.attn  # open_clip.transformer.Attention
        dim = x.shape[-1]
        b_v = attn.in_proj_bias[2 * dim :] if attn.in_proj_bias is not None else None
        v = F.linear(block.ln_1(x), attn.in_proj_weight[2 * dim :], b_v)
        if attn.head_scale is not None:  # per-head scale, applied to the attention output in Attention
            v = (v.unflatten(-1, (attn.num_heads, -1)) * attn.head_scale.view(attn.num_heads, 1)).flatten(-2)
        v = attn.out_drop(attn.out_proj(attn.ln_inner(v)))
        y = x + block.ls_1(block.ln_attn(v))
    else:
        raise NotImplementedError(f"Local features for vision blocks of type {type(block).__name__}")
    return y + block.ls_2(block.mlp(block.ln_2(y)))


def vit_global_and_local(visual: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """(global [B, E], local [B, P, E]) unnormalised features of an open_clip ``VisionTransformer``.

    One pass: the tokens entering the last block come from the block runner of
    :func:`visual_forward_intermediates`; the last block is run normally for the global path (so it
    equals ``visual(images)`` exactly) and through its value path without token mixing for the local
    path: ``ln_post(v)[:, 1:] @ proj``. With patch dropout active (training mode) the local tokens are
    the kept patches only.
    """
    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(
            f"Local features need open_clip's VisionTransformer tower, got {type(visual).__name__} "
            "(ResNet, timm and other towers are not supported)."
        )
    if visual.attn_pool is not None:
        raise NotImplementedError("Local features for vision towers with attentional pooling (CoCa)")
    if visual.pool_type not in ("tok", "avg"):
        raise NotImplementedError(f"Local features for vision pool_type {visual.pool_type!r}")
    tr = visual.transformer
    _, x = _vit_blocks(visual, images, [], len(tr.resblocks) - 2)  # tokens entering the last block
    last = tr.resblocks[-1]
    use_ckpt = tr.grad_checkpointing and torch.is_grad_enabled()
    x_global = checkpoint(last, x, use_reentrant=False) if use_ckpt else last(x)
    x_local = _value_path(last, x)
    if not tr.batch_first:
        x_global, x_local = x_global.transpose(0, 1), x_local.transpose(0, 1)
    pooled, _ = visual._pool(x_global)
    local = visual.ln_post(x_local)[:, 1:]
    if visual.proj is not None:
        pooled = pooled @ visual.proj
        local = local @ visual.proj
    return pooled, local
