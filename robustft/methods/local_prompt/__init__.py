"""Local-Prompt (Zeng et al., "Extensible Local Prompts for Few-Shot OOD Detection", ICLR 2025).

Few-shot prompt tuning that keeps CLIP and the hand-crafted *global* prompt ("a photo of a {c}.")
frozen and learns only *local* prompts, matched against MaskCLIP-style per-patch features
(``CLIPBackbone.encode_image_with_local``):

* class-specific local prompts ``ℓ_c`` (CoOp CSC context, ``PromptLearner``) and a bank of M negative
  local prompts ``n_m`` without a class name (default 300), both initialised N(0, 0.02);
* global-prompt-guided negative augmentation: of the V random-resized-crop views of an image
  (``data.n_views: 16``, ``data.augmentation: random_resized_crop_full``), the ``num_pos`` views most
  similar to the true class under the frozen global prompt are positives and the least similar is the
  negative (:func:`~robustft.methods.local_prompt.ops.select_views`);
* losses ``L_pos + λ_neg·L_neg + λ_div·L_div`` (5 and 0.5), logged as ``local_pos``, ``local_neg``,
  ``neg_div`` (each already weighted); one optimizer step per positive view (``step_per: view``, the
  paper's trainer, manual optimisation) or one step on their mean (``step_per: batch``, cheaper, NOT
  equivalent: the paper's 8 sequential steps see updated prompts);
* inference: global MCM ``S_G`` + regional score ``S_R`` (scores ``local_prompt``, ``regional_mcm``;
  ``mcm``/``glmcm`` are the zero-shot baselines of the same frozen CLIP), local-aware ID classification,
  and an optional externally trained global prompt (``global_prompt``, e.g. a CoOp/LoCoOp prompt) at
  inference only (the paper's "extensible" claim, issue #4 of the official repo).

Few-shot subsets come from the datamodule (``data.shots_per_class``, ``data.shots_seed``), identical
for every method. The formulas live in :mod:`robustft.methods.local_prompt.ops`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import open_clip
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from robustft.backbones.clip import PromptLearner, freeze
from robustft.methods.base import ConfigMismatchError
from robustft.methods.local_prompt.ops import (
    diversity_loss,
    local_aware_logits,
    negative_local_loss,
    positive_local_loss,
    regional_probabilities,
    regional_topk_values,
    select_views,
)
from robustft.methods.zero_shot import ZeroShotCLIP
from robustft.optim import WARMUP_COSINE

__all__ = ["LocalPrompt"]

#: the official optimizer (``configs/trainers/LOCALPROMPT/vit_b16_ep30.yaml``)
SGD_LOCAL_PROMPT: dict[str, Any] = {
    "class_path": "torch.optim.SGD",
    "init_args": {"lr": 0.002, "momentum": 0.9, "weight_decay": 5.0e-4},
}
STEP_PER = ("view", "batch")
CLASSIFIERS = ("local_aware", "global")


class LocalPrompt(ZeroShotCLIP):
    """Local-Prompt: frozen CLIP + frozen global prompt, trainable class and negative local prompts.

    Args (besides those of :class:`ZeroShotCLIP`; ``templates`` is the frozen global prompt, default
    ``["a photo of a {}."]`` as the official code):
        n_ctx: context tokens of every local prompt (official 16; the micro CLIP's 16-token context
            needs fewer).
        n_neg_prompts: M negative local prompts (official 300; >= 2 when ``lambda_div > 0``).
        num_pos: positive views per image (official 8); needs ``data.n_views`` > ``num_pos``.
        train_topk: k of the top-k regions in ``L_pos`` / ``L_neg`` (official README command 50;
            the argparse default 20 is what ``scripts/train.sh``'s ``$10`` bug silently gave).
        eval_top_k: k of the regional score (top-k (region, class) pairs, official 10; clipped to R·K)
            and of the local-aware classifier (clipped to the number of regions R).
        lambda_neg, lambda_div: loss weights (5, 0.5).
        temperature: T on the ``s·cos`` training logits (official 1, i.e. 0.01 on cosines).
        eval_temperature: T on raw cosines at inference (official 1).
        step_per: ``view`` (default, one optimizer step per positive view) or ``batch``.
        classifier: ``local_aware`` (default) or ``global`` (zero-shot) ``logits``.
        global_prompt: a ``.pt`` file with a ``[K, E]`` tensor of global text features (e.g. a trained
            CoOp prompt's ``PromptLearner()`` output) used instead of the hand-crafted prompt at
            inference and for view selection; or call :meth:`set_global_prompt`.
        clip_val: gradient-norm clipping of every manual step (``None``: none, as the official code).
        optimizer, scheduler: default SGD lr 0.002, momentum 0.9, wd 5e-4; cosine per step.
    """

    default_score = "local_prompt"
    default_scores = ("local_prompt", "regional_mcm", "mcm", "glmcm")
    trainable: ClassVar[bool] = True

    def __init__(
        self,
        clip_model: str,
        pretrained: str | None = None,
        num_classes: int | None = None,
        class_names: list[str] | str | None = None,
        templates: list[str] | None = None,
        context_length: int | None = None,
        n_ctx: int = 16,
        n_neg_prompts: int = 300,
        num_pos: int = 8,
        train_topk: int = 50,
        eval_top_k: int = 10,
        lambda_neg: float = 5.0,
        lambda_div: float = 0.5,
        temperature: float = 1.0,
        eval_temperature: float = 1.0,
        step_per: str = "view",
        classifier: str = "local_aware",
        global_prompt: str | None = None,
        clip_val: float | None = None,
        scores: list[str] | None = None,
        score_kwargs: dict[str, dict[str, Any]] | None = None,
        optimizer: OptimizerCallable = SGD_LOCAL_PROMPT,
        scheduler: LRSchedulerCallable | None = WARMUP_COSINE,
    ) -> None:
        if isinstance(class_names, str):
            if class_names != "imagenet":
                raise ValueError(f"model.class_names: give a list of names or 'imagenet', got {class_names!r}")
            class_names = list(open_clip.IMAGENET_CLASSNAMES)
        super().__init__(
            clip_model, pretrained, num_classes, class_names,
            list(templates) if templates is not None else ["a photo of a {}."], context_length,
            scores=scores, score_kwargs=score_kwargs,
        )
        self.save_hyperparameters()
        self.optimizer_config = optimizer
        self.scheduler_config = scheduler
        self.automatic_optimization = False  # one optimizer step per positive view
        self.manual_clip_val = clip_val
        self._validate(n_ctx, n_neg_prompts, num_pos, train_topk, eval_top_k, lambda_neg, lambda_div,
                       temperature, eval_temperature, step_per, classifier)
        freeze(self.backbone)  # CLIP, incl. logit scale; the global prompt is text, never a parameter
        self.neg_prompts = (
            PromptLearner(self.backbone, None, n_ctx=n_ctx, n_prompts=n_neg_prompts) if n_neg_prompts else None
        )
        self.local_prompts: PromptLearner | None = None
        if self._class_names is not None:
            self._build_local_prompts()
        self._external_global: Tensor | None = None
        if global_prompt is not None:
            self.set_global_prompt(torch.load(Path(global_prompt), map_location="cpu", weights_only=True))
        self._prompt_cache: tuple[tuple, tuple[Tensor, Tensor]] | None = None

    @staticmethod
    def _validate(n_ctx, n_neg, num_pos, train_topk, eval_top_k, lambda_neg, lambda_div, temperature,
                  eval_temperature, step_per, classifier) -> None:
        checks = [
            (n_ctx >= 1, f"model.n_ctx must be >= 1, got {n_ctx}"),
            (n_neg >= 0, f"model.n_neg_prompts must be >= 0, got {n_neg}"),
            (n_neg >= 1 or lambda_neg == 0, "model.n_neg_prompts is 0 but lambda_neg > 0: the negative loss needs "
             "negative prompts; set n_neg_prompts >= 1 or lambda_neg: 0"),
            (n_neg >= 2 or lambda_div == 0, f"model.n_neg_prompts is {n_neg} but lambda_div > 0: the diversity "
             "loss needs >= 2 negative prompts; raise n_neg_prompts or set lambda_div: 0"),
            (num_pos >= 1, f"model.num_pos must be >= 1, got {num_pos}"),
            (train_topk >= 1, f"model.train_topk must be >= 1, got {train_topk}"),
            (eval_top_k >= 1, f"model.eval_top_k must be >= 1, got {eval_top_k}"),
            (lambda_neg >= 0 and lambda_div >= 0, "model.lambda_neg and model.lambda_div must be >= 0"),
            (temperature > 0 and eval_temperature > 0, "model.temperature and model.eval_temperature must be > 0"),
            (step_per in STEP_PER, f"model.step_per must be one of {STEP_PER}, got {step_per!r}"),
            (classifier in CLASSIFIERS, f"model.classifier must be one of {CLASSIFIERS}, got {classifier!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    # ------------------------------------------------------------------ prompts
    def _build_local_prompts(self) -> None:
        names = self.class_names
        if self.local_prompts is not None and self.local_prompts.class_names == names:
            return
        if self.local_prompts is not None:
            raise ConfigMismatchError(
                f"the local prompts were built for classes {self.local_prompts.class_names[:5]}... but the model "
                f"now has {names[:5]}...; set model.init_args.class_names to the training classes"
            )
        prompts = PromptLearner(self.backbone, names, n_ctx=self.hparams.n_ctx, class_specific=True)
        self.local_prompts = prompts.to(self.backbone.device)

    def setup(self, stage: str) -> None:
        super().setup(stage)  # class names from the datamodule
        self._build_local_prompts()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # ZeroShotCLIP restores the class names first
        if self._class_names is not None:
            self._build_local_prompts()  # before Lightning loads the state dict into them

    def set_global_prompt(self, features: Tensor | PromptLearner | None) -> None:
        """Use another global prompt at inference (and for view selection): a ``[K, E]`` tensor of text
        features or a trained ``PromptLearner`` (its current output is taken, frozen). ``None``: back
        to the hand-crafted templates."""
        if isinstance(features, PromptLearner):
            with torch.no_grad():
                features = features(normalize=True)
        if features is not None:
            features = torch.as_tensor(features).detach().float()
            if features.ndim != 2 or features.shape[1] != self.backbone.embed_dim:
                raise ValueError(
                    f"model.global_prompt must hold [K, {self.backbone.embed_dim}] text features, got "
                    f"{tuple(features.shape)}"
                )
            features = torch.nn.functional.normalize(features, dim=-1)
        self._external_global = features

    def global_text_features(self) -> Tensor:
        """``[K, E]`` frozen global prompt features (hand-crafted templates or ``global_prompt``)."""
        if self._external_global is None:
            return self.class_text_features()
        if self._external_global.shape[0] != self.num_classes:
            raise ConfigMismatchError(
                f"model.global_prompt has {self._external_global.shape[0]} classes but the model has {self.num_classes}"
            )
        return self._external_global.to(self.backbone.device)

    def prompt_features(self) -> tuple[Tensor, Tensor]:
        """``(local [K, E], negative [M, E])`` normalised local-prompt text features. Cached outside
        autograd (evaluation) until a prompt parameter changes; recomputed with grad in training."""
        if self.local_prompts is None:
            self._build_local_prompts()
        assert self.local_prompts is not None
        params = [self.local_prompts.ctx] + ([self.neg_prompts.ctx] if self.neg_prompts is not None else [])
        key = tuple((p.data_ptr(), p._version, p.device) for p in params)
        if not torch.is_grad_enabled() and self._prompt_cache is not None and self._prompt_cache[0] == key:
            return self._prompt_cache[1]
        local = self.local_prompts(normalize=True)
        if self.neg_prompts is not None:
            neg = self.neg_prompts(normalize=True)
        else:
            neg = local.new_zeros(0, local.shape[1])
        if not torch.is_grad_enabled():
            self._prompt_cache = (key, (local, neg))
        return local, neg

    def param_groups(self) -> list[dict[str, Any]]:
        if self.local_prompts is None:
            self._build_local_prompts()
        return [{"name": "local_prompts", "params": self.trainable_parameters()}]

    def train(self, mode: bool = True) -> LocalPrompt:
        super().train(mode)
        self.backbone.eval()  # frozen CLIP stays in eval mode when the module is put in training mode
        return self

    # ------------------------------------------------------------------ evaluation
    def output_keys(self) -> set[str]:
        return super().output_keys() | {"regional_topk"}

    def forward_eval(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """ONE pass of the vision tower: global and local features; scores read ``cosine`` (frozen global
        prompt), ``regional_topk`` and, for GL-MCM / NegLabel, ``local_cosine`` / ``neg_cosine``."""
        hp = self.hparams
        required = self._required()
        image, local = self.backbone.encode_image_with_local(batch["image"], normalize=True)
        text = self.global_text_features().to(image.dtype)
        cosine = image @ text.T
        ell, neg = (f.to(image.dtype) for f in self.prompt_features())
        local_cos = local @ ell.T  # [B, R, K]
        probs = regional_probabilities(local_cos, local @ neg.T, hp.eval_temperature)
        if hp.classifier == "local_aware":
            logits = local_aware_logits(cosine, local_cos, hp.eval_top_k, hp.eval_temperature)
        else:
            logits = self.backbone.logit_scale * cosine
        out = {"logits": logits, "cosine": cosine, "features": image,
               "regional_topk": regional_topk_values(probs, min(hp.eval_top_k, probs[0].numel()))}
        if "local_cosine" in required:
            out["local_cosine"] = local @ text.T
        if "neg_cosine" in required:
            out["neg_cosine"] = image @ self.negative_text_features().to(image.dtype).T
        return out

    # ------------------------------------------------------------------ training
    def encode_views(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Frozen features of every view and the view selection (no grad).

        Returns ``(positive_local [num_pos, B, R, E], negative_local [B, R, E], positives [num_pos, B])``.
        """
        if images.ndim != 5:
            raise ConfigMismatchError(
                f"Local-Prompt trains on several views per image ([B, V, C, H, W]); got image shape "
                f"{tuple(images.shape)}: set data.n_views (official 16) > model.num_pos ({self.hparams.num_pos})"
            )
        b, v = images.shape[:2]
        with torch.no_grad():
            glob, local = self.backbone.encode_image_with_local(images.flatten(0, 1), normalize=True)
            glob, local = glob.view(b, v, -1), local.view(b, v, *local.shape[1:])
            text = self.global_text_features().to(glob.dtype)
            similarity = (glob * text[labels.long()].unsqueeze(1)).sum(-1)  # [B, V]
            positives, negative = select_views(similarity, self.hparams.num_pos)
            rows = torch.arange(b, device=images.device)
            return local[rows, positives], local[rows, negative[0]], positives

    def view_losses(self, pos_local: Tensor, neg_local: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The weighted terms on one positive view ``[B, R, E]`` (or several stacked on the batch axis)
        and the negative view ``[B, R, E]`` (``labels`` match ``pos_local``; the negative view's labels
        are the first ``len(neg_local)``)."""
        hp = self.hparams
        ell, neg = self.prompt_features()
        scale = self.backbone.logit_scale.detach()
        k, t = hp.train_topk, hp.temperature
        pos = positive_local_loss(scale * pos_local @ ell.T, scale * pos_local @ neg.T, labels, k, t)
        losses = {"local_pos": pos}
        if hp.lambda_neg > 0:
            a, b = scale * neg_local @ ell.T, scale * neg_local @ neg.T
            losses["local_neg"] = hp.lambda_neg * negative_local_loss(a, b, labels[: len(neg_local)], k, t)
        if hp.lambda_div > 0:
            losses["neg_div"] = hp.lambda_div * diversity_loss(neg)
        return losses

    def training_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The terms averaged over the positive views (the ``step_per: batch`` objective): ``L_pos`` is
        the mean over views and images, ``L_neg`` and ``L_div`` are the same for every positive view."""
        labels = batch["label"]
        pos_local, neg_local, _ = self.encode_views(batch["image"], labels)
        n = pos_local.shape[0]
        return self.view_losses(pos_local.flatten(0, 1), neg_local, labels.repeat(n))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        labels = batch["label"]
        if self.hparams.step_per == "batch":
            return self.manual_step(self.training_losses(batch), batch_size=len(labels))
        pos_local, neg_local, _ = self.encode_views(batch["image"], labels)
        total = torch.zeros(())
        for view in pos_local:  # the paper's trainer: one step per positive view, same negative view
            total = self.manual_step(self.view_losses(view, neg_local, labels), batch_size=len(labels))
        return total

    def total_training_steps(self) -> int:
        per_batch = self.hparams.num_pos if self.hparams.step_per == "view" else 1
        return per_batch * super().total_training_steps()
