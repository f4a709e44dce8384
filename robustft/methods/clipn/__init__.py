"""CLIPN (Wang et al., ICCV 2023, ``xmed-lab/CLIPN``): teach a frozen CLIP to say "no".

A second text tower, the "no" tower, starts as an exact copy of the frozen "yes" text tower and is
trained on image-caption pairs so that an image agrees with the yes embedding of its own caption and
with the no embedding of every other caption, while each caption's no embedding moves opposite its yes
embedding. The image tower, the yes tower and ``logit_scale`` stay frozen, so classification is exactly
zero-shot CLIP's; OOD detection uses the per-class yes/no probabilities (CTW / ATD,
:mod:`robustft.ood.clipn_scores`).

Two variants (``variant``):

* ``learnable`` (the official ``src/``): both towers read the same caption tokens; ``n_prompts``
  zero-initialised "no" prompts ``[n_prompts, L, W]`` are ADDED to the no tower's token + position
  embeddings. Training draws, per sample, one of the ``n_prompts`` prompts or their mean
  (``n_prompts + 1`` options, uniformly); evaluation uses the mean.
* ``handcrafted`` (the official ``hand-crafted/``): no prompts; a paired template is drawn per sample,
  ``templates[t]`` wraps the caption for the yes tower and ``no_templates[t]`` for the no tower
  (``"a photo of a {}."`` / ``"a photo of no {}."``).

Losses on a batch of N pairs (under DDP the image, yes and no features of all ranks are gathered with
gradients, so the terms see the global batch as the official multi-GPU code does), with
``p^yes_ij = σ(s f_i·g_j - s f_i·h_j)`` a 2-way softmax per (image i, caption j) pair:
``L_yes = -mean_i log p^yes_ii``, ``L_no = -mean_{i≠j} log(1 - p^yes_ij)``,
``L_tso = mean_j [2 - sqrt(2 - 2 g_j·h_j + 1e-4)]``, total ``0.5 (L_yes + L_no + L_tso)``; the terms are
logged as ``itbo_yes``, ``itbo_no`` and ``tso``, each already weighted by 0.5. Unlike the official code
(whose loss only runs with >= 2 processes), one device works.

Captions: a batch's ``text`` (webdataset ``.txt``, CC3M-style) when present, else class names in the
caption templates (offline, e.g. the bundled CIFAR-10 train images).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from robustft.backbones.clip import TextTower, freeze
from robustft.data.captions import caption_codes, check_templates
from robustft.methods.clipn.ops import clipn_losses, negate_templates
from robustft.methods.finetune import resolve_class_names, resolve_templates
from robustft.methods.zero_shot import ZeroShotCLIP
from robustft.ood.clipn_scores import atd_decision, ctw_decision
from robustft.optim import WARMUP_COSINE

__all__ = ["ADAMW_CLIPN", "CLIPN", "NO_PAIRS", "VARIANTS", "clipn_losses", "negate_templates"]

VARIANTS = ("learnable", "handcrafted")
NO_PAIRS = ("all", "other_class")
#: the official optimiser (open_clip's training defaults, ``src/run.sh``): AdamW lr 3e-4, betas (0.9, 0.98),
#: eps 1e-6, weight decay 0.2 on >= 2-D weights (``param_groups`` exempts gains and biases)
ADAMW_CLIPN: dict[str, Any] = {
    "class_path": "torch.optim.AdamW",
    "init_args": {"lr": 3.0e-4, "betas": [0.9, 0.98], "eps": 1.0e-6, "weight_decay": 0.2},
}


class CLIPN(ZeroShotCLIP):
    """CLIPN: a trained "no" text tower (+ learnable no-prompts) on a frozen CLIP; CTW / ATD scores.

    Args (besides ``clip_model``, ``pretrained``, ``num_classes``, ``templates``, ``context_length``,
    ``neg_*``, ``scores``, ``score_kwargs`` of :class:`ZeroShotCLIP`):
        class_names: ID class names (a list, or ``imagenet`` for open_clip's 1000 names); default: the
            training data's. Given explicitly, the training data is only a source of (image, caption)
            pairs (e.g. CC3M shards) and its own classes are not checked against them.
        templates: prompt templates (``"a photo of a {}."``) or a named set (``openai_imagenet``, ...);
            the class embeddings average them, for both towers; offline training captions draw one per
            sample. Default: the 9 CLIP CIFAR templates.
        variant: ``learnable`` (no-prompts, default) or ``handcrafted`` (paired yes/no templates).
        n_prompts: number of learnable no-prompts (official 16; ``learnable`` only).
        no_templates: ``handcrafted`` only: the no-template paired with each of ``templates``; default
            each template with ``" of a "`` replaced by ``" of no "``.
        eval_scale: the scale ``s`` of the yes / no logits at evaluation; ``None`` (default, our
            CHOICE): the frozen ``exp(logit_scale)`` used in training, so ``logits`` equal
            :class:`ZeroShotCLIP`'s. The official code hard-codes 100 (= the LAION models' logit scale).
        no_pairs: which unmatched pairs L_no pushes to "no": ``all`` (official: every image with every
            other sample's caption) or ``other_class`` (our CHOICE for class-name captions: pairs of the same
            class are left out, since "a photo of a cat" is no negative for another cat image; needs
            labelled batches without source captions).
        gather_distributed: under DDP compute the losses on the all-gathered global batch (with
            gradients), as the official multi-GPU loss does.
        optimizer, scheduler: default :data:`ADAMW_CLIPN` and cosine without warm-up (official).

    Outputs of :meth:`forward_eval`: ``logits`` (yes logits ``s·cos(f, w_k)``), ``no_logits``
    (``s·cos(f, u_k)``), ``cosine`` (yes cosines, MCM), ``features``.
    """

    default_score = "atd"
    default_scores = ("atd", "ctw", "mcm", "msp", "maxlogit", "energy")
    trainable = True

    def __init__(
        self,
        clip_model: str,
        pretrained: str | None = None,
        num_classes: int | None = None,
        class_names: list[str] | str | None = None,
        templates: list[str] | str | None = None,
        context_length: int | None = None,
        neg_candidates: str | None = None,
        neg_templates: dict[str, list[str]] | None = None,
        neg_eta: float = 0.95,
        neg_topk: float = 0.15,
        scores: list[str] | None = None,
        score_kwargs: dict[str, dict[str, Any]] | None = None,
        variant: str = "learnable",
        n_prompts: int = 16,
        no_templates: list[str] | None = None,
        eval_scale: float | None = None,
        no_pairs: str = "all",
        gather_distributed: bool = True,
        optimizer: OptimizerCallable = ADAMW_CLIPN,
        scheduler: LRSchedulerCallable | None = WARMUP_COSINE,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"model.variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if variant == "learnable" and int(n_prompts) < 1:
            raise ValueError(f"model.n_prompts must be >= 1 for the learnable variant, got {n_prompts}")
        if no_pairs not in NO_PAIRS:
            raise ValueError(f"model.no_pairs must be one of {', '.join(NO_PAIRS)}, got {no_pairs!r}")
        if eval_scale is not None and not (math.isfinite(eval_scale) and eval_scale > 0):
            raise ValueError(f"model.eval_scale must be a positive number or null, got {eval_scale}")
        if isinstance(class_names, str):
            class_names = resolve_class_names(class_names, num_classes or 1000)
        if isinstance(templates, str):  # a named set (openai_imagenet, ...): callables -> "{}" strings
            templates = [t("{}") if callable(t) else t for t in resolve_templates(templates)]
        super().__init__(
            clip_model, pretrained, num_classes, class_names, templates, context_length, neg_candidates,
            neg_templates, neg_eta, neg_topk, scores, score_kwargs,
        )
        self.save_hyperparameters()
        self.optimizer_config = optimizer
        self.scheduler_config = scheduler
        self.templates = check_templates(self.templates, "model.templates")
        self.no_templates: list[str] | None = None
        if variant == "handcrafted":
            given = list(no_templates) if no_templates is not None else negate_templates(self.templates)
            self.no_templates = check_templates(given, "model.no_templates")
            if len(self.no_templates) != len(self.templates):
                raise ValueError(
                    f"model.no_templates lists {len(self.no_templates)} templates but model.templates {len(self.templates)}; "
                    "give one no-template per template (they are drawn in pairs)"
                )
        elif no_templates is not None:
            raise ValueError("model.no_templates is only used by variant: handcrafted; remove it or set the variant")
        # Frozen: image tower, yes tower, logit_scale (everything the backbone holds).
        freeze(self.backbone)
        #: the "no" text tower, an exact, independent, trainable copy of the (pre-trained) yes tower
        self.no_tower: TextTower = copy.deepcopy(self.backbone.text_tower).requires_grad_(True)
        self.prompt_no: nn.Parameter | None = None
        if variant == "learnable":
            shape = (int(n_prompts), self.no_tower.context_length, self.no_tower.width)
            self.prompt_no = nn.Parameter(torch.zeros(shape))
        self._no_cache: tuple[tuple, Tensor] | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        if self.hparams.class_names is None:
            return super().setup(stage)
        # Explicit class names: CLIPN is zero-shot w.r.t. its training data, which only supplies
        # (image, caption) pairs (CC3M has no classes); link the preprocessing, skip the class checks.
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(datamodule, "set_preprocess") and getattr(datamodule, "preprocess", None) is None:
            datamodule.set_preprocess(self.preprocess)
        data_names = getattr(datamodule, "class_names", None) if stage == "fit" else None
        if data_names and list(data_names) != self.class_names:
            rank_zero_warn(
                f"model.class_names ({len(self.class_names)} names) differ from the training data's classes "
                f"({len(data_names)}); training captions come from the batches' 'text' when they have one, else "
                "from model.class_names indexed by the data's labels"
            )

    # ------------------------------------------------------------------ parameters
    def param_groups(self) -> list[dict[str, Any]]:
        """Official open_clip grouping: weight decay on >= 2-D weights and the no-prompts, none on
        gains / biases (``wd_mult`` 0)."""
        named = list(self.no_tower.named_parameters())
        decay = [p for _, p in named if p.ndim >= 2]
        if self.prompt_no is not None:
            decay.append(self.prompt_no)
        return [
            {"name": "no_tower", "params": decay},
            {"name": "no_tower_gain_bias", "params": [p for _, p in named if p.ndim < 2], "wd_mult": 0.0},
        ]

    # ------------------------------------------------------------------ text
    def _tokenize(self, texts: list[str], truncate: bool = False) -> Tensor:
        return self.backbone.tokenize(texts, truncate=truncate)

    def prompt_choices(self, n: int) -> Tensor:
        """``[n]`` option per sample in ``0..n_prompts``: prompt i, or ``n_prompts`` = their mean (uniform)."""
        assert self.prompt_no is not None
        return torch.randint(self.prompt_no.shape[0] + 1, (n,), device=self.prompt_no.device)

    def no_prompts(self, n: int) -> Tensor:
        """``[n, L, W]`` prompts added to the no tower's embeddings: drawn per sample in training mode,
        their mean in eval mode."""
        assert self.prompt_no is not None
        mean = self.prompt_no.mean(dim=0, keepdim=True)
        if not self.training:
            return mean.expand(n, -1, -1)
        options = torch.cat([self.prompt_no, mean])
        return options[self.prompt_choices(n)]

    def encode_no(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        """No-tower embeddings of token ids ``[N, L]`` (plus the no-prompts in the learnable variant)."""
        embeddings, eot = self.no_tower.embed_tokens(tokens)
        if self.prompt_no is not None:
            embeddings = embeddings + self.no_prompts(len(tokens))[:, : embeddings.shape[1]].to(embeddings.dtype)
        return self.no_tower.encode_embeddings(embeddings, eot, normalize=normalize)

    def _no_version(self) -> tuple:
        params = list(self.no_tower.parameters()) + ([self.prompt_no] if self.prompt_no is not None else [])
        dev = self.backbone.device
        autocast = (torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type))
        return (*((p.data_ptr(), p._version) for p in params), tuple(self.class_names), str(dev), autocast)

    def class_no_features(self) -> Tensor:
        """``[K, E]`` no embeddings of the ID classes: ``normalize(mean_t normalize(E_no(t(c))))`` over the
        templates (the no-templates in the hand-crafted variant), with the mean prompt. Cached until the
        no tower or the prompts change."""
        version = self._no_version()
        if self._no_cache is not None and self._no_cache[0] == version:
            return self._no_cache[1]
        names = self.class_names
        templates = self.no_templates or self.templates
        tokens = self._tokenize([t.format(c) for c in names for t in templates])
        was_training = self.training
        self.train(False)  # the mean prompt, whatever the mode
        try:
            with torch.no_grad():
                emb = self.encode_no(tokens.to(self.backbone.device))
        finally:
            self.train(was_training)
        weights = F.normalize(emb.view(len(names), len(templates), -1).mean(dim=1), dim=-1)
        self._no_cache = (version, weights)
        return weights

    def train(self, mode: bool = True) -> CLIPN:
        super().train(mode)
        self.backbone.train(False)  # frozen towers stay in eval mode (no dropout; official freezes them)
        return self

    # ------------------------------------------------------------------ evaluation
    def output_keys(self) -> set[str]:
        return super().output_keys() | {"no_logits"}

    def eval_logit_scale(self) -> Tensor:
        scale = self.hparams.eval_scale
        return self.backbone.logit_scale if scale is None else torch.tensor(float(scale), device=self.backbone.device)

    def forward_eval(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = super().forward_eval(batch)  # one vision pass; logits, cosine, features (+ local / neg)
        image = out["features"]
        scale = self.eval_logit_scale().to(image.dtype)
        out["logits"] = scale * out["cosine"]
        out["no_logits"] = scale * (image @ self.class_no_features().to(image.dtype).T)
        return out

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Per-sample predictions plus both rules' threshold-free decisions (``True`` = OOD)."""
        outputs = self.forward_eval(batch)
        logits, no_logits = outputs["logits"].float(), outputs["no_logits"].float()
        return {
            "index": batch["index"],
            "prediction": logits.argmax(1),
            "ctw_ood": ctw_decision(logits, no_logits),
            "atd_ood": atd_decision(logits, no_logits),
            **self.ood_scores(outputs),
        }

    def summarize_outputs(self, outputs: dict[str, Tensor]) -> dict[str, Any]:
        """The fraction of the set that each threshold-free rule calls OOD (report meta ``set_summaries``):
        near 0 on the ID test set and near 1 on an OOD set is what CTW / ATD promise without a threshold."""
        logits, no_logits = outputs["logits"].float(), outputs["no_logits"].float()
        return {"ctw_ood_fraction": float(ctw_decision(logits, no_logits).float().mean()),
                "atd_ood_fraction": float(atd_decision(logits, no_logits).float().mean())}

    # ------------------------------------------------------------------ training
    def caption_pairs(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``(yes_tokens [B, L], no_tokens [B, L])`` of a training batch.

        Learnable: both towers read the same caption (the batch's ``text``, else ``templates[t]`` of the
        class name, t drawn per sample). Hand-crafted: the caption (``text``, else the class name) is
        wrapped in the pair ``(templates[t], no_templates[t])``, t drawn per sample.
        """
        texts = batch.get("text")
        labels = batch.get("label")
        if texts is None:
            if labels is None:
                raise ValueError("a CLIPN training batch needs 'text' captions or 'label's to build captions from")
            labels = labels.long()
            k = len(self.class_names)
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
                raise ValueError(
                    f"training labels must lie in [0, {k}) (model.class_names), got {int(labels.min())}..{int(labels.max())}"
                )
        n = len(texts) if texts is not None else len(labels)
        codes = caption_codes(torch.zeros(n, dtype=torch.long), len(self.templates))  # template per sample
        if self.no_templates is None:
            if texts is not None:
                tokens = self._tokenize(list(texts), truncate=True)  # long web captions: truncated as open_clip
            else:
                names = [self.class_names[int(c)] for c in labels]
                tokens = self._tokenize([self.templates[int(t)].format(c) for t, c in zip(codes, names, strict=True)])
            return tokens, tokens
        bases = list(texts) if texts is not None else [self.class_names[int(c)] for c in labels]
        yes_texts = [self.templates[int(t)].format(b) for t, b in zip(codes, bases, strict=True)]
        no_texts = [self.no_templates[int(t)].format(b) for t, b in zip(codes, bases, strict=True)]
        truncate = texts is not None
        return self._tokenize(yes_texts, truncate), self._tokenize(no_texts, truncate)

    def training_features(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """``(image, yes, no)`` normalised ``[B, E]`` embeddings of this rank's batch (only ``no`` has a graph)."""
        yes_tokens, no_tokens = self.caption_pairs(batch)
        device = self.backbone.device
        with torch.no_grad():
            image = self.backbone.encode_image(batch["image"], normalize=True)
            yes = self.backbone.encode_text(yes_tokens.to(device), normalize=True)
        no = self.encode_no(no_tokens.to(device))
        return image, yes, no

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        ids = None
        if self.hparams.no_pairs == "other_class":
            if batch.get("text") is not None or batch.get("label") is None:
                raise ValueError(
                    "model.no_pairs: other_class compares class labels, but this batch has source captions ('text') "
                    "or no labels; use no_pairs: all for captioned data (CC3M)"
                )
            ids = batch["label"]
        image, yes, no = self.training_features(batch)
        trainer = self._trainer
        if self.hparams.gather_distributed and trainer is not None and trainer.world_size > 1:
            image = self.all_gather(image, sync_grads=True).flatten(0, 1)
            yes = self.all_gather(yes, sync_grads=True).flatten(0, 1)
            no = self.all_gather(no, sync_grads=True).flatten(0, 1)
            ids = None if ids is None else self.all_gather(ids).flatten(0, 1)
        losses = clipn_losses(image, yes, no, self.backbone.logit_scale, ids)
        if trainer is not None:
            with torch.no_grad():
                self.log("train/cos_yes_no", (yes * no).sum(-1).mean(), batch_size=len(image))
        return losses

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._no_cache = None  # the version check notices the step too; being explicit is free
