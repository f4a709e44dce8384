"""The evaluation contract every method fulfils, and the Lightning plumbing they share.

Evaluation (the ``OODEvaluation`` callback and ``python -m robustft evaluate``) never special-cases a
method. It only calls:

- :meth:`OODMethod.forward_eval` -- ONE forward pass over a batch returning every tensor the scores
  need (``logits``, ``features``, ...);
- :meth:`OODMethod.fit_reference` -- once per evaluation, for scores that need ID training statistics;
- :meth:`OODMethod.ood_scores` -- ``{score name: [B] tensor}``, higher = more in-distribution.

Training, shared by every method (subclasses never re-implement the step):

- :meth:`OODMethod.training_losses` -- ``{term: scalar}``; the total loss is the SUM of the terms (a
  method weights its terms itself). ``train/<term>`` and ``train/loss`` are logged every step, and a
  NaN/Inf loss stops the run with :class:`NonFiniteLossError` naming the term, step and epoch.
- Automatic optimisation (the default): Lightning steps the optimizer; ``trainer.gradient_clip_val``
  clips. Manual optimisation (``automatic_optimization = False``, e.g. one step per view): the
  subclass calls :meth:`OODMethod.manual_step` once per step it wants; it does the logging, the finite
  check, ``manual_backward`` (precision plugin), clipping to ``manual_clip_val`` (Lightning refuses
  ``trainer.gradient_clip_val`` here), the optimizer step and the per-step scheduler step.
- :meth:`OODMethod.param_groups` -- parameter groups with ``lr_mult`` / ``wd_mult`` multipliers of the
  configured optimizer's ``lr`` / ``weight_decay``.
- ``optimizer`` / ``scheduler`` constructor arguments (Lightning's ``OptimizerCallable`` /
  ``LRSchedulerCallable``): any optimizer / scheduler class by ``class_path`` in YAML
  (:mod:`robustft.optim`).

Subclasses implement ``forward_eval`` and ``training_losses`` and name their ``default_score``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from robustft.backbones.base import PreprocessConfig
from robustft.checkpointing import CHECKPOINT_KEY
from robustft.distributed_failures import raise_on_any_rank
from robustft.optim import SGD_CIFAR, WARMUP_COSINE, build_optimizer, build_scheduler, callable_spec


class ConfigMismatchError(ValueError):
    """Model and data (or checkpoint) disagree; the message names both sides and the fix."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/Inf; the message names the term, the step and what to change."""


#: hyper-parameters holding an optimizer / scheduler (stored in checkpoints as class_path/init_args dicts)
OPTIMIZATION_HPARAMS = ("optimizer", "scheduler")


def method_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def method_mismatch_message(checkpoint_method: str, configured_method: str) -> str:
    """Why a checkpoint of one method cannot be loaded into another, and the two ways out."""
    return (
        f"the checkpoint is from method {checkpoint_method} but the model is {configured_method}; "
        f"set model.class_path: {checkpoint_method} (or drop the model section to take it from the checkpoint)"
    )


class OODMethod(pl.LightningModule):
    """Base LightningModule of every robustft method.

    Args:
        num_classes: number of ID classes; must match the datamodule's training set.
        scores: post-hoc OOD scores to evaluate (registry names); defaults to the method's own list.
        score_kwargs: hyper-parameters per score, e.g. ``{"knn": {"k": 50}}``.
        optimizer: the optimizer, any class by ``class_path`` / ``init_args`` (its parameters are
            injected); default SGD lr 0.01, momentum 0.9, weight decay 5e-4 (:data:`robustft.optim.SGD_CIFAR`).
        scheduler: the learning-rate schedule (its optimizer is injected), or ``null`` for a constant
            rate; default :class:`robustft.optim.WarmupCosine` (per step, cosine to 0 over the run, no
            warm-up).

    Attributes set by subclasses:
        manual_clip_val, manual_clip_algorithm: gradient clipping applied by :meth:`manual_step`
            under manual optimisation (``None``: no clipping; ``"norm"`` or ``"value"``). A manual
            subclass exposes them as its own constructor arguments when users should set them.
    """

    #: score the method's paper reports; evaluation reports every configured score
    default_score: ClassVar[str] = "msp"
    #: scores evaluated when the config does not list any
    default_scores: ClassVar[tuple[str, ...]] = ("msp", "maxlogit", "energy")

    def __init__(
        self,
        num_classes: int,
        scores: list[str] | None = None,
        score_kwargs: dict[str, dict[str, Any]] | None = None,
        optimizer: OptimizerCallable = SGD_CIFAR,
        scheduler: LRSchedulerCallable | None = WARMUP_COSINE,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigMismatchError(f"model.num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        #: the optimizer / scheduler arguments as given (spec dict, class or callable)
        self.optimizer_config: Any = optimizer
        self.scheduler_config: Any = scheduler
        self.manual_clip_val: float | None = None
        self.manual_clip_algorithm: str = "norm"
        self.score_names: list[str] = []
        self.score_kwargs: dict[str, dict[str, Any]] = {}
        self._scores: dict | None = None
        #: ``{"epoch", "global_step"}`` of the checkpoint these weights were loaded from (None: not loaded)
        self.loaded_checkpoint: dict[str, int | None] | None = None
        self.configure_scores(list(scores) if scores else list(self.default_scores), dict(score_kwargs or {}))

    # ------------------------------------------------------------------ contract for subclasses
    @property
    def preprocess(self) -> PreprocessConfig:
        """How the datamodule must prepare images for this model (size, mean, std)."""
        raise NotImplementedError

    def forward_eval(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One forward pass; returns at least ``logits`` [B, K] (for ID accuracy)."""
        raise NotImplementedError

    def training_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The named scalar loss terms of one training batch, e.g. ``{"ce": ...}`` or
        ``{"contrastive": ..., "alignment": λ·R}``. The optimised loss is their sum: weight each term
        here. ``loss`` is reserved for the total."""
        raise NotImplementedError

    def output_keys(self) -> set[str]:
        """Keys :meth:`forward_eval` returns; scores needing other keys are refused up front."""
        return {"logits"}

    def classifier_head(self) -> tuple[Tensor, Tensor] | None:
        """The final linear layer ``(W [K, D], b [K])`` for ViM/ReAct/ASH, if the method has one."""
        return None

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: dicts with ``params`` and optionally ``name``, ``lr_mult``
        and ``wd_mult`` (multipliers of the configured optimizer's ``lr`` and ``weight_decay``, default 1).
        Parameters with ``requires_grad=False`` are dropped (and so are groups left empty); every
        trainable parameter must be in exactly one group. Default: one group of every trainable parameter."""
        return [{"name": "all", "params": self.trainable_parameters()}]

    # ------------------------------------------------------------------ OOD scores
    def configure_scores(
        self, scores: list[str] | None = None, score_kwargs: dict[str, dict] | None = None
    ) -> None:
        """Re-configure which scores are computed (``scores``) and/or their hyper-parameters
        (``score_kwargs``, replacing the previous ones); ``None`` keeps that part. Names are validated
        against the score registry; the scores are rebuilt (and must be re-fitted) on next use."""
        names = list(self.score_names if scores is None else scores)
        kwargs = {k: dict(v) for k, v in (self.score_kwargs if score_kwargs is None else score_kwargs).items()}
        if not names:
            raise ConfigMismatchError("model.scores is empty; list at least one score or leave it unset")
        self._validate_score_names(names)
        unknown = set(kwargs) - set(names)
        if unknown:
            raise ConfigMismatchError(
                f"model.score_kwargs names {sorted(unknown)}, which are not in model.scores {names}"
            )
        self.score_names = names
        self.score_kwargs = kwargs
        self._scores = None

    @staticmethod
    def _validate_score_names(names: list[str]) -> None:
        from robustft.ood.scores import SCORES

        for name in names:
            try:
                SCORES.get(name)
            except KeyError as exc:
                raise ConfigMismatchError(f"model.scores: {exc.args[0]}") from None

    def build_scores(self) -> dict:
        """Instantiate the configured scores and check the method can feed them (fails fast)."""
        from robustft.ood.scores import build_score, check_score_requirements

        scores = {}
        for name in self.score_names:
            score = build_score(name, **self.score_kwargs.get(name, {}))
            check_score_requirements(score, self.output_keys(), self.classifier_head() is not None)
            scores[name] = score
        return scores

    @property
    def scores(self) -> dict:
        if self._scores is None:
            self._scores = self.build_scores()
        return self._scores

    def needs_reference(self) -> bool:
        return any(score.needs_fit for score in self.scores.values())

    def fit_reference(self, reference_outputs: dict[str, Tensor] | None) -> None:
        """Prepare the scores for one evaluation: fit those that need ID training statistics (KNN bank,
        class means, ...) on ``reference_outputs`` and hand the current classifier head to those that
        recompute logits (ViM, ReAct, ASH). Called before every evaluation, since weights change."""
        head = self.classifier_head()
        head = None if head is None else (head[0].detach().float(), head[1].detach().float())
        for score in self.scores.values():
            if score.needs_fit or score.needs_head:
                score.fit(reference_outputs or {}, head)

    def ood_scores(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{score name: [N] scores}``, higher = more in-distribution."""
        return {name: score(outputs) for name, score in self.scores.items()}

    def summarize_outputs(self, outputs: dict[str, Tensor]) -> dict[str, Any] | None:
        """Method-specific numbers about one evaluated set (the ID test set or an OOD set), written into
        the report's ``meta["set_summaries"][<set>]``; ``None`` (the default) writes nothing. For what the
        scores do not show, e.g. CLIPN's threshold-free OOD decisions (the fraction of a set each rule
        calls OOD). Called once per set with the set's full, gathered evaluation outputs."""
        return None

    # ------------------------------------------------------------------ Lightning plumbing
    def setup(self, stage: str) -> None:
        """Check the class count against the data, and hand the datamodule this model's preprocessing
        when nobody passed one (the CLI links it at instantiation; Python users may not): the datamodule
        never reaches into the model. Lightning calls this before any dataloader is built."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(datamodule, "set_preprocess") and getattr(datamodule, "preprocess", None) is None:
            datamodule.set_preprocess(self.preprocess)
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ConfigMismatchError(
                f"model.num_classes is {self.num_classes} but the training data (data.train) has {data_classes} "
                f"classes; set model.init_args.num_classes: {data_classes}"
            )

    # ------------------------------------------------------------------ training
    @staticmethod
    def total_loss(losses: Mapping[str, Tensor]) -> Tensor:
        """The optimised loss: the sum of the terms."""
        if not losses:
            raise ValueError("training_losses() returned no loss term")
        total: Tensor | None = None
        for value in losses.values():
            total = value if total is None else total + value
        assert total is not None
        return total

    @staticmethod
    def _batch_size(batch: Any) -> int | None:
        """Samples of the labelled stream (``batch["labeled"]`` when an unlabelled stream rides along)."""
        if isinstance(batch, Mapping) and isinstance(batch.get("labeled"), Mapping):
            batch = batch["labeled"]
        if isinstance(batch, Mapping):
            for key in ("label", "image"):
                value = batch.get(key)
                if isinstance(value, Tensor) and value.ndim > 0:
                    return len(value)
        return None

    def checked_total_loss(self, losses: Mapping[str, Tensor], batch_size: int | None = None) -> Tensor:
        """Sum the terms, refuse a NaN/Inf loss naming the term, and log ``train/<term>`` and
        ``train/loss``. Used by the automatic step and by :meth:`manual_step`."""
        for name, value in losses.items():
            if name == "loss":
                raise ValueError(f"{type(self).__name__}.training_losses(): 'loss' is reserved for the total; rename it")
            if not isinstance(value, Tensor) or value.ndim != 0:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{type(self).__name__}.training_losses()['{name}'] must be a scalar tensor, got {shape}")
        total = self.total_loss(losses)
        message = None
        if not bool(torch.isfinite(total)):  # one device sync per step; the terms are inspected only on failure
            bad = [(name, v.item()) for name, v in losses.items() if not bool(torch.isfinite(v))]
            what = ", ".join(f"term '{name}' is {value}" for name, value in bad) or (
                f"the total of the terms {sorted(losses)} is {total.item()}"
            )
            message = (
                f"training loss {what} at global step {self.global_step} (epoch {self.current_epoch}); "
                "lower the learning rate (model.init_args.optimizer.init_args.lr), check the input "
                "normalisation, or clip gradients (trainer.gradient_clip_val; under manual optimisation the "
                "method's manual_clip_val)"
            )
        # Under DDP every rank raises together (a NaN on one shard must not leave the others waiting in the
        # gradient all-reduce), the failing rank's message included; costs one tiny all-reduce per step
        # when world_size > 1, nothing with one process (robustft.distributed_failures).
        raise_on_any_rank(self._trainer, message, NonFiniteLossError)
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), batch_size=batch_size)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
        return total

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Automatic optimisation: return the checked total for Lightning to back-propagate. Manual
        optimisation: one :meth:`manual_step` on the batch's losses (override to step more often)."""
        if not self.automatic_optimization:
            return self.manual_step(self.training_losses(batch), batch_size=self._batch_size(batch))
        return self.checked_total_loss(self.training_losses(batch), self._batch_size(batch))

    def manual_step(self, losses: Mapping[str, Tensor], batch_size: int | None = None) -> Tensor:
        """One optimizer step on ``losses`` under manual optimisation (``automatic_optimization = False``).

        Logs the terms and the total, refuses NaN/Inf (naming the term), back-propagates through
        ``manual_backward`` (so the precision plugin scales and unscales), clips the gradients to
        ``manual_clip_val`` with ``manual_clip_algorithm`` (in :meth:`on_before_optimizer_step`, after
        AMP's unscaling), steps and zeroes the optimizer, and steps a per-step scheduler. Returns the
        detached total."""
        if self.automatic_optimization:
            raise RuntimeError(
                f"{type(self).__name__}.manual_step needs automatic_optimization = False; with automatic "
                "optimisation return the losses from training_losses() and let Lightning step"
            )
        total = self.checked_total_loss(losses, batch_size)
        optimizer = self.optimizers()
        if isinstance(optimizer, list):
            raise RuntimeError("manual_step drives exactly one optimizer; configure_optimizers returned several")
        self.manual_backward(total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None and self._scheduler_interval() == "step":
            scheduler.step()
        return total.detach()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Manual optimisation: clip to ``manual_clip_val`` here, where AMP has already unscaled the
        gradients (Lightning clips ``trainer.gradient_clip_val`` itself under automatic optimisation).
        Subclasses overriding this hook call ``super().on_before_optimizer_step(optimizer)``."""
        if not self.automatic_optimization and self.manual_clip_val is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.manual_clip_val, gradient_clip_algorithm=self.manual_clip_algorithm
            )

    def on_train_epoch_end(self) -> None:
        """Manual optimisation: step a per-epoch scheduler (Lightning does so under automatic optimisation)."""
        if not self.automatic_optimization and self._scheduler_interval() == "epoch":
            scheduler = self.lr_schedulers()
            if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step()

    def _scheduler_interval(self) -> str:
        configs = self.trainer.lr_scheduler_configs if self._trainer is not None else []
        return configs[0].interval if configs else "step"

    # ------------------------------------------------------------------ optimizers
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """:meth:`param_groups` checked: frozen parameters and empty groups dropped, every trainable
        parameter in exactly one group, ``lr`` / ``weight_decay`` given only as multipliers."""
        groups = []
        seen: set[int] = set()
        for i, group in enumerate(self.param_groups()):
            name = group.get("name", str(i))
            fixed = {"lr", "weight_decay"} & set(group)
            if fixed:
                raise ValueError(
                    f"{type(self).__name__}.param_groups() group '{name}' sets {sorted(fixed)}; give lr_mult / "
                    "wd_mult (multipliers of the configured optimizer's values) instead"
                )
            params = [p for p in group["params"] if p.requires_grad]
            if any(id(p) in seen for p in params):
                raise ValueError(f"{type(self).__name__}.param_groups(): a parameter of group '{name}' is in another group too")
            seen.update(id(p) for p in params)
            if params:
                groups.append({**group, "name": name, "params": params})
        missing = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in seen]
        if missing:
            raise ValueError(
                f"{type(self).__name__}.param_groups() leaves out trainable parameters {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}; add them to a group or set requires_grad=False"
            )
        return groups

    def total_training_steps(self) -> int:
        """Scheduler steps of the whole run, handed to a scheduler whose ``total_steps`` is ``None``: the
        trainer's estimated optimizer steps. A manual subclass stepping k times per batch returns k times that."""
        return int(self.trainer.estimated_stepping_batches)

    def configure_optimizers(self) -> Any:
        """Build ``optimizer`` over :meth:`param_groups` (each group's ``lr`` and ``weight_decay`` = the
        configured value times its ``lr_mult`` / ``wd_mult``), then ``scheduler`` (``total_steps`` filled
        in from :meth:`total_training_steps`), stepped per step or per epoch as its ``interval`` says."""
        optimizer = build_optimizer(self.optimizer_param_groups(), self.optimizer_config)
        base_lr = optimizer.defaults.get("lr")
        base_wd = optimizer.defaults.get("weight_decay")
        for group in optimizer.param_groups:
            if base_lr is not None:
                group["lr"] = base_lr * float(group.get("lr_mult", 1.0))
            if base_wd is not None:
                group["weight_decay"] = base_wd * float(group.get("wd_mult", 1.0))
        total = self.total_training_steps() if self._trainer is not None else None
        scheduler = build_scheduler(optimizer, self.scheduler_config, total)
        if scheduler is None:
            return optimizer
        config: dict[str, Any] = {"scheduler": scheduler, "interval": getattr(scheduler, "interval", "epoch")}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ------------------------------------------------------------------ evaluation steps
    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> None:
        logits = self.forward_eval(batch)["logits"]
        self.accumulate_eval_metrics(stage, logits, batch["label"])

    def accumulate_eval_metrics(self, stage: str, logits: Tensor, labels: Tensor) -> None:
        """Add one batch to ``<stage>/acc`` and ``<stage>/loss`` (logged at the end of the epoch).

        Kept as sums (correct count, sample count, summed cross-entropy) on the device, reduced across
        ranks once per epoch, so the logged accuracy is exactly ``correct / n`` over the whole set, equal
        to the report's ``id.acc``. Lightning's ``self.log(..., sync_dist=True)`` would instead average
        per-rank float32 means, wrong as soon as ranks hold different numbers of samples; with the
        datamodule's unpadded distributed sampler they do (and a padded one counts repeats)."""
        sums = self._eval_sums.get(stage)
        counts = torch.stack([(logits.argmax(dim=1) == labels).sum(), labels.new_tensor(len(labels))])
        loss = F.cross_entropy(logits.float(), labels, reduction="sum").reshape(1)
        self._eval_sums[stage] = (counts, loss) if sums is None else (sums[0] + counts, sums[1] + loss)

    @property
    def _eval_sums(self) -> dict[str, tuple[Tensor, Tensor]]:
        if "_eval_sums_store" not in self.__dict__:
            self.__dict__["_eval_sums_store"] = {}
        return self.__dict__["_eval_sums_store"]

    def _log_eval_sums(self, stage: str) -> None:
        """Reduce this epoch's sums across ranks and log ``<stage>/acc`` and ``<stage>/loss``.

        Every rank takes part (a rank whose shard was empty contributes zeros), and nothing is logged
        when no rank accumulated anything (e.g. a method whose own ``_eval_step`` logs other metrics)."""
        sums = self._eval_sums.pop(stage, None)
        if sums is None:
            sums = (torch.zeros(2, dtype=torch.long, device=self.device), torch.zeros(1, device=self.device))
        counts = self.trainer.strategy.reduce(sums[0].clone(), reduce_op="sum")
        loss = self.trainer.strategy.reduce(sums[1].clone(), reduce_op="sum")
        correct, n = (int(v) for v in counts.tolist())
        if n == 0:
            return
        # identical on every rank after the reduction: "max" keeps the value bit for bit (no warning that
        # an epoch-level value is not synced, no rounding of a mean)
        self.log(f"{stage}/loss", float(loss.item()) / n, sync_dist=True, reduce_fx="max")
        self.log(f"{stage}/acc", correct / n, prog_bar=True, sync_dist=True, reduce_fx="max")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._eval_sums.pop("val", None)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_sums("val")

    def on_test_epoch_start(self) -> None:
        self._eval_sums.pop("test", None)

    def on_test_epoch_end(self) -> None:
        self._log_eval_sums("test")

    def on_predict_start(self) -> None:
        """Fit the scores that need ID training statistics (KNN, MDS, ViM, ...) on the datamodule's
        reference set, exactly as ``evaluate`` does, before the first ``predict_step``."""
        from robustft.evaluation.engine import collect_outputs

        datamodule = getattr(self.trainer, "datamodule", None)
        reference = None
        if self.needs_reference():
            if datamodule is None or not hasattr(datamodule, "reference_dataset"):
                raise ConfigMismatchError(
                    f"model.scores {[n for n, s in self.scores.items() if s.needs_fit]} need ID training "
                    "statistics: run predict with an OODDataModule (data.train) or drop these scores"
                )
            reference = collect_outputs(
                self, datamodule, datamodule.reference_dataset(), self.device, "ID reference (train)"
            )
        self.fit_reference(reference)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        outputs = self.forward_eval(batch)
        return {"index": batch["index"], "prediction": outputs["logits"].argmax(1), **self.ood_scores(outputs)}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"method": method_path(type(self)), "num_classes": self.num_classes}
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict):
            # checkpoints hold plain data (they are read with weights_only=True): an optimizer given in
            # Python as a class or partial is stored as its class_path/init_args spec
            for key in OPTIMIZATION_HPARAMS:
                value = hparams.get(key)
                if value is not None and not isinstance(value, Mapping):
                    spec = callable_spec(value)
                    if spec is None:
                        rank_zero_warn(
                            f"model.{key} {value!r} cannot be stored in the checkpoint's hyper-parameters; "
                            "the method's default is recorded instead"
                        )
                        hparams.pop(key)
                    else:
                        hparams[key] = spec

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another method before its weights produce a wall of key errors."""
        info = checkpoint.get(CHECKPOINT_KEY)
        if info is None:
            raise ConfigMismatchError(
                "the checkpoint was not written by robustft (no 'robustft' entry); to use plain weights, set "
                "model.init_args.backbone_weights instead of --ckpt_path"
            )
        if info["method"] != method_path(type(self)):
            raise ConfigMismatchError(method_mismatch_message(info["method"], method_path(type(self))))
        if info.get("num_classes") not in (None, self.num_classes):
            raise ConfigMismatchError(
                f"the checkpoint has {info['num_classes']} classes but model.num_classes is {self.num_classes}"
            )
        self.loaded_checkpoint = {"epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step")}
