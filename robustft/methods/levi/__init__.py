"""LEVI: a layer-wise ensemble of a frozen pre-trained model F and a small task model G trained from
scratch (Roh et al., ICML 2024; spec ``methods-robust-finetuning.md`` section 1).

**No official code exists and the paper body could not be read**: the architecture below is *our
reading* of the paper's description, with every choice configurable and marked [CHOICE]:

1. F (a CLIP image tower, a timm model or a CIFAR ResNet) is frozen and always in eval mode (no
   dropout, BatchNorm statistics never move), even while the LightningModule trains; LoRA on F
   (through ``peft``) is an option.
2. A set S of F's feature levels is read in one pass with ``backbone.forward_intermediates(images, S)``
   (no forward hooks, hence nothing to duplicate or remove when a model is reloaded) and each level
   is pooled at once (:func:`~robustft.methods.levi.modules.pool_view`): ``h_l`` of width ``d_l``.
3. G (:func:`~robustft.methods.levi.modules.build_small_model`, a small CNN by default) gives ``u``
   of width ``d_s``.
4. The adapting layers (:class:`~robustft.methods.levi.modules.LayerwiseAdapter`) LayerNorm each
   view and either concatenate them into one MLP (``concat``, default) or average the logits of one
   head per F layer (``per_layer``).
5. Loss: cross-entropy only; weight decay comes from the optimizer.

Reductions that the tests check: ``small_model: null`` with ``layers: [-1]`` on a CNN is an MLP probe
on F's pooled final features; ``layers: []`` is G trained from scratch with the adapter as its head
(same seed, same logits: F is built on a forked RNG, so the seed alone decides G's and A's initial
weights whatever F is).

**Feature caching** (``cache_features: true``): when F is frozen (no LoRA) and the training images are
the same pixels every epoch (``data.augmentation: none``, one view), F's pooled features of each
training image are computed in the first epoch and reused afterwards (keyed by the sample's
``index``), so later epochs run only G and the adapter. With augmentation the pixels change every
epoch and caching would train on stale features: ``setup`` refuses that combination.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from robustft.backbones import create_backbone
from robustft.backbones.base import PreprocessConfig, resolve_indices
from robustft.methods.base import ConfigMismatchError, OODMethod
from robustft.methods.levi.modules import (
    DEFAULT_SMALL_MODEL,
    TOKEN_POOLS,
    LayerwiseAdapter,
    build_small_model,
    pool_view,
)
from robustft.optim import WARMUP_COSINE

__all__ = ["ADAMW_LEVI", "LEVI", "inject_lora"]

#: the spec's default optimizer for G and the adapters: AdamW lr 1e-3, weight decay 0.05 [CHOICE]
ADAMW_LEVI: dict[str, Any] = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1.0e-3, "weight_decay": 0.05}}


def inject_lora(backbone: nn.Module, config: Mapping[str, Any]) -> list[nn.Parameter]:
    """Add LoRA adapters to ``backbone`` in place with ``peft`` (``inject_adapter_in_model``) and return
    the LoRA parameters (the only trainable ones of F afterwards). ``config`` holds ``peft.LoraConfig``
    arguments, e.g. ``{r: 8, lora_alpha: 16, target_modules: [conv1, conv2]}``."""
    try:
        import peft
    except ImportError as exc:
        raise ConfigMismatchError(
            "model.lora needs the 'peft' package: pip install 'robustft[lora]' (or pip install peft), "
            "or set model.lora: null"
        ) from exc
    config = dict(config)
    if "target_modules" not in config:
        raise ConfigMismatchError(
            "model.lora.target_modules is required: the names of F's layers to adapt (e.g. [conv1, conv2] for a "
            "CIFAR ResNet, [qkv, proj, fc1, fc2] for a timm ViT, [attn, c_fc, c_proj] for an open_clip ViT)"
        )
    _refuse_bypassed_targets(backbone, config["target_modules"])
    try:
        lora_config = peft.LoraConfig(**config)
        peft.inject_adapter_in_model(lora_config, backbone)
    except (TypeError, ValueError) as exc:
        raise ConfigMismatchError(f"model.lora: peft refused the configuration {config}: {exc}") from exc
    params = []
    for name, param in backbone.named_parameters():
        is_lora = "lora_" in name
        param.requires_grad_(is_lora)
        if is_lora:
            params.append(param)
    if not params:
        raise ConfigMismatchError(f"model.lora.target_modules {config['target_modules']} matched no layer of F")
    return params


def _refuse_bypassed_targets(backbone: nn.Module, targets: Any) -> None:
    """``nn.MultiheadAttention`` reads its ``out_proj`` weights directly and never calls its forward, so
    LoRA on ``out_proj`` would train nothing (measured: no gradient reaches it); peft adapts the
    attention module itself when it is targeted (``attn``)."""
    if isinstance(targets, str):  # a regular expression: peft's own matching, not checked here
        return
    for name, module in backbone.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            child = f"{name}.out_proj" if name else "out_proj"
            if any(child == t or child.endswith(f".{t}") for t in targets):
                raise ConfigMismatchError(
                    f"model.lora.target_modules: '{child}' is inside nn.MultiheadAttention, which bypasses its "
                    "forward, so LoRA there would never train; target the attention module itself (e.g. 'attn')"
                )


def _prefix_tokens(backbone: nn.Module) -> int:
    """Prefix (class / register) tokens in front of the patch tokens of F's token levels."""
    model = getattr(backbone, "model", None)  # TimmBackbone
    if model is not None and hasattr(model, "num_prefix_tokens"):
        return int(model.num_prefix_tokens)
    return 1  # open_clip ViT towers: the class token


class LEVI(OODMethod):
    """Frozen F read at several layers + small G from scratch + adapting layers (our reading of LEVI).

    Args:
        num_classes: number of ID classes.
        backbone: F: a registered name (``cifar_resnet56``), ``timm/<model>`` or ``clip:<open_clip model>``.
        backbone_weights: F's weights (local file, open_clip tag, ``timm-pretrained``); ``None``: random
            F (tests only: LEVI assumes a pre-trained F).
        backbone_kwargs: extra constructor arguments of F.
        layers: S, F's feature levels in ``forward_intermediates`` numbering (negative ones count from the
            end); ``None``: the spec's default [CHOICE]: the last 2 levels of a CNN (4-D stage outputs),
            the last 4 blocks of a transformer; ``[]``: no F view (G alone).
        token_pool: pooling of token levels: ``cls`` (class token) or ``mean`` (patch tokens) [CHOICE].
        small_model: G: ``{kind: cnn, widths: [...], stem_stride: 1}`` or ``{kind: backbone, name: ...,
            kwargs: {...}}``, always randomly initialised; ``None``: G off.
        adapter_mode: ``concat`` (one MLP over all views, default) or ``per_layer`` (one head per F
            layer on ``[LN(h_l); LN(u)]``, logits averaged).
        adapter_hidden: hidden width of each adapter MLP (0: a linear head) [CHOICE: 512].
        adapter_dropout: dropout between the adapter's two Linear layers [CHOICE: 0.1].
        view_norm: LayerNorm each view before the adapter (spec pitfall: scale mismatch) [CHOICE].
        lora: ``peft.LoraConfig`` arguments for LoRA on F (needs ``peft``; ``None``: F fully frozen).
        lora_lr_mult: LoRA's learning rate relative to the optimizer's ``lr`` (the spec's 1e-4 vs 1e-3).
        cache_features: reuse F's features of each training image across epochs (frozen F and
            ``data.augmentation: none`` only; see the module docstring).
        scores, score_kwargs, scheduler: see :class:`~robustft.methods.base.OODMethod`.
        optimizer: default AdamW lr 1e-3, weight decay 0.05 (:data:`ADAMW_LEVI`).

    Outputs of ``forward_eval``: ``logits``; ``features`` (concat mode: the adapter's hidden
    activations, the input of its last Linear, which ``classifier_head`` returns; per-layer mode: the
    normalised views); ``views`` (the adapter input ``[LN(h_1); ...; LN(u)]``, for
    ``score_kwargs: {knn: {feature_key: views}}``). Loss terms: ``ce``.
    """

    default_score = "msp"
    default_scores = ("msp", "maxlogit", "energy")

    def __init__(
        self,
        num_classes: int = 10,
        backbone: str = "cifar_resnet56",
        backbone_weights: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        layers: list[int] | None = None,
        token_pool: str = "cls",
        small_model: dict[str, Any] | None = DEFAULT_SMALL_MODEL,
        adapter_mode: str = "concat",
        adapter_hidden: int = 512,
        adapter_dropout: float = 0.1,
        view_norm: bool = True,
        lora: dict[str, Any] | None = None,
        lora_lr_mult: float = 0.1,
        cache_features: bool = False,
        scores: list[str] | None = None,
        score_kwargs: dict[str, dict[str, Any]] | None = None,
        optimizer: OptimizerCallable = ADAMW_LEVI,
        scheduler: LRSchedulerCallable | None = WARMUP_COSINE,
    ) -> None:
        super().__init__(num_classes, scores, score_kwargs, optimizer, scheduler)
        self.save_hyperparameters()
        if token_pool not in TOKEN_POOLS:
            raise ConfigMismatchError(f"model.token_pool: unknown '{token_pool}'; choose {' or '.join(TOKEN_POOLS)}")
        if not 0.0 < lora_lr_mult < float("inf"):
            raise ConfigMismatchError(f"model.lora_lr_mult must be a finite number > 0, got {lora_lr_mult}")
        if cache_features and lora is not None:
            raise ConfigMismatchError(
                "model.cache_features cannot be combined with model.lora: LoRA changes F's features every step; "
                "set cache_features: false"
            )
        # F is built (and LoRA initialised) on a forked RNG: the seed alone decides G's and A's weights
        with torch.random.fork_rng(devices=[]):
            self.backbone = create_backbone(backbone, weights=backbone_weights, **(backbone_kwargs or {}))
            if hasattr(self.backbone, "release_text_tower"):  # CLIP: keep the image tower only
                self.backbone.release_text_tower()
            self.backbone.requires_grad_(False)
            if lora is not None:
                inject_lora(self.backbone, lora)
        self.backbone.eval()
        self._prefix_tokens = _prefix_tokens(self.backbone)
        self.layers, backbone_dims = self._resolve_layers(layers)
        self.small_model = build_small_model(small_model)
        self.adapter = LayerwiseAdapter(
            backbone_dims,
            None if self.small_model is None else int(self.small_model.feature_dim),
            num_classes,
            mode=adapter_mode,
            hidden=adapter_hidden,
            dropout=adapter_dropout,
            view_norm=view_norm,
        )
        self._cache: Tensor | None = None  # [N, sum(d_l)] pooled F features per training index
        self._cache_filled: Tensor | None = None

    # ------------------------------------------------------------------ construction
    @torch.no_grad()
    def _probe(self, indices: list[int]) -> dict[int, Tensor]:
        size = self.backbone.preprocess.image_size
        levels = self.backbone.forward_intermediates(torch.zeros(1, 3, size, size), indices)
        return {i: pool_view(x, self.hparams.token_pool, self._prefix_tokens) for i, x in levels.items()}

    def _resolve_layers(self, layers: list[int] | None) -> tuple[list[int], list[int]]:
        """S as sorted non-negative levels, and d_l of each (one probe pass of F on a blank image)."""
        if layers is not None and len(layers) == 0:
            return [], []
        count = self.backbone.num_intermediates
        if layers is None:  # [CHOICE] last 2 stages of a CNN, last 4 blocks of a transformer
            candidates = resolve_indices(count, min(4, count), "feature level")
            size = self.backbone.preprocess.image_size
            with torch.no_grad():
                last = self.backbone.forward_intermediates(torch.zeros(1, 3, size, size), [count - 1])[count - 1]
            chosen = candidates[-2:] if last.ndim == 4 else candidates
        else:
            try:
                chosen = resolve_indices(count, list(layers), "feature level")
            except ValueError as exc:
                raise ConfigMismatchError(f"model.layers: {exc}") from None
        pooled = self._probe(chosen)
        return chosen, [int(pooled[i].shape[-1]) for i in chosen]

    # ------------------------------------------------------------------ modes and groups
    @property
    def lora_params(self) -> list[nn.Parameter]:
        """F's LoRA parameters (empty without ``lora``): the only parameters of F that train."""
        return [p for n, p in self.backbone.named_parameters() if "lora_" in n]

    def train(self, mode: bool = True) -> LEVI:
        """F stays in eval mode whatever ``mode`` is: no dropout in F, BatchNorm statistics never move."""
        super().train(mode)
        self.backbone.eval()
        return self

    def param_groups(self) -> list[dict[str, Any]]:
        """G and the adapters at the optimizer's ``lr``; LoRA (if any) at ``lora_lr_mult`` times it."""
        trained = [*(self.small_model.parameters() if self.small_model is not None else []), *self.adapter.parameters()]
        groups: list[dict[str, Any]] = [{"name": "levi", "params": trained}]
        if self.lora_params:
            groups.append({"name": "lora", "params": list(self.lora_params), "lr_mult": self.hparams.lora_lr_mult})
        return groups

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.backbone.preprocess

    # ------------------------------------------------------------------ views
    def backbone_views(self, images: Tensor) -> list[Tensor]:
        """``[h_l for l in S]``: F's pooled levels (no graph through F unless LoRA trains)."""
        if not self.layers:
            return []
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.hparams.lora is not None):
            levels = self.backbone.forward_intermediates(images, self.layers)
        return [pool_view(levels[i], self.hparams.token_pool, self._prefix_tokens) for i in self.layers]

    def _cached_backbone_views(self, images: Tensor, index: Tensor) -> list[Tensor]:
        """F's pooled levels of training images, computed once per image index (``cache_features``)."""
        dims = self.adapter.backbone_dims
        needed = int(index.max()) + 1
        if self._cache is None or self._cache.device != images.device or len(self._cache) < needed:
            size = max(needed, 2 * len(self._cache)) if self._cache is not None else needed
            cache = torch.zeros(size, sum(dims), device=images.device)
            filled = torch.zeros(size, dtype=torch.bool, device=images.device)
            if self._cache is not None:
                cache[: len(self._cache)] = self._cache.to(images.device)
                filled[: len(self._cache)] = self._cache_filled.to(images.device)
            self._cache, self._cache_filled = cache, filled
        if not bool(self._cache_filled[index].all()):
            with torch.no_grad():
                flat = torch.cat(self.backbone_views(images), dim=1).float()
            self._cache[index] = flat
            self._cache_filled[index] = True
        return list(self._cache[index].split(dims, dim=1))

    def clear_feature_cache(self) -> None:
        self._cache, self._cache_filled = None, None

    def views(self, images: Tensor, index: Tensor | None = None) -> list[Tensor]:
        """``[h_{l_1}, ..., h_{l_M}, u]``; the F part comes from the cache for training images when
        ``cache_features`` is on."""
        if index is not None and self.hparams.cache_features and self.training and self.layers:
            out = self._cached_backbone_views(images, index)
        else:
            out = self.backbone_views(images)
        if self.small_model is not None:
            out.append(self.small_model(images))
        return out

    def forward(self, images: Tensor) -> Tensor:
        return self.adapter(self.views(images))

    # ------------------------------------------------------------------ evaluation contract
    def forward_eval(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits, features, adapter_input = self.adapter.logits_and_features(self.views(batch["image"]))
        return {"logits": logits, "features": features, "views": adapter_input}

    def output_keys(self) -> set[str]:
        return {"logits", "features", "views"}

    def classifier_head(self) -> tuple[Tensor, Tensor] | None:
        if self.adapter.mode != "concat":
            return None
        last = self.adapter.heads[0][-1]
        return last.weight, last.bias

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.hparams.cache_features:
            datamodule = getattr(self.trainer, "datamodule", None)
            augmentation = getattr(datamodule, "augmentation", None)
            if augmentation not in (None, "none") or getattr(datamodule, "n_views", 1) != 1:
                raise ConfigMismatchError(
                    f"model.cache_features: true needs the same training pixels every epoch, but data.augmentation "
                    f"is '{augmentation}' (n_views {getattr(datamodule, 'n_views', 1)}): set data.augmentation: none "
                    "and n_views: 1, or cache_features: false"
                )

    def on_fit_start(self) -> None:
        self.clear_feature_cache()  # F's weights may have been (re)loaded since the cache was filled

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.clear_feature_cache()

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        if "labeled" in batch:  # an unlabelled stream is configured: LEVI uses the labelled one only
            batch = batch["labeled"]
        images = batch["image"]
        if images.ndim == 5:
            raise ConfigMismatchError("LEVI trains on one view per image; set data.n_views: 1")
        logits = self.adapter(self.views(images, batch.get("index")))
        return {"ce": F.cross_entropy(logits, batch["label"])}
