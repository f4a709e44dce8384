"""Run a method over ID and OOD sets once and turn its scores into the report.

Shared by the per-epoch :class:`~robustft.callbacks.OODEvaluation` callback and the ``evaluate``
subcommand, so the two can never disagree. Each sample goes through ``forward_eval`` exactly once;
every score is computed from those cached outputs.

``test`` / ``evaluate`` run Lightning's test loop over the ID test set (it logs ``test/acc``) and then the
OOD evaluation at the end of that epoch. :class:`CaptureTestOutputs` (which ``RobustTrainer`` always has)
keeps the test loop's own ``forward_eval`` outputs, and :func:`evaluate_model` uses them as the ID test
outputs instead of forwarding the ID test set a second time; ``test/acc`` and the report's ``id.acc``
then come from the same logits. Anything that makes those outputs unusable (a ``test_step`` that does
not forward each sample once, ``limit_test_batches``, other dataloaders) falls back to a second pass,
which is slower but never wrong.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset

from robustft.data.datamodule import OODDataModule, sample_eval_set
from robustft.evaluation.distributed import ShardSampler, _all_gather_uneven, gather_by_index, world
from robustft.methods.base import OODMethod
from robustft.ood.metrics import ood_metrics
from robustft.ood.report import build_report
from robustft.ood.scores import build_score, tune_score


class EvaluationConfigError(ValueError):
    """The evaluation cannot run as configured (no OOD sets, empty set, ...)."""


class NonFiniteOutputsError(FloatingPointError):
    """The model itself produced NaN/Inf (diverged weights), as opposed to a score function overflowing."""


def check_finite_outputs(model: OODMethod, outputs: dict[str, Tensor], set_name: str) -> None:
    """Refuse NaN/Inf model outputs where they appear, naming the output, the set and the training step.

    Without this check they surface later as "the score function overflowed", which blames the score
    for what is a diverged model (e.g. a learning rate of 1e6)."""
    for key, value in outputs.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).any(dim=-1).sum()) if value.ndim > 1 else int((~torch.isfinite(value)).sum())
            raise NonFiniteOutputsError(
                f"the model's outputs are NaN/Inf: '{key}' of {bad} sample(s) of the {set_name} set, with the "
                f"weights of epoch {model.current_epoch}, global step {model.global_step}. The weights diverged "
                "during training: lower the learning rate (model.init_args.optimizer.init_args.lr), enable gradient clipping (trainer.gradient_clip_val), or "
                "evaluate an earlier checkpoint"
            )


@dataclass
class EvaluationResult:
    """The report plus the raw per-sample scores (for histograms / ROC plots)."""

    report: dict[str, Any]
    id_scores: dict[str, Tensor]
    ood_scores: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)


def precision_context(model: OODMethod) -> AbstractContextManager:
    """The precision forward passes run under: the attached trainer's (``trainer.precision_plugin``'s
    ``forward_context``, i.e. autocast under ``bf16-mixed`` / ``16-mixed``, exactly as in training), or
    none when the model is not attached to a trainer. Only forward passes run in it: scores are computed
    afterwards from float32 outputs."""
    trainer = model._trainer  # the public ``model.trainer`` raises when detached
    return trainer.precision_plugin.forward_context() if trainer is not None else nullcontext()


@torch.no_grad()
def collect_outputs(
    model: OODMethod, datamodule: OODDataModule, dataset: Dataset, device: torch.device, set_name: str = "evaluation"
) -> dict[str, Tensor]:
    """``forward_eval`` over ``dataset`` (this rank's shard), gathered across ranks, ordered by index.

    Forward passes run in the trainer's precision (:func:`precision_context`); floating outputs are
    returned as float32. Raises :class:`NonFiniteOutputsError` (on every rank, after the gather) if the model output NaN/Inf."""
    loader = datamodule.eval_loader(dataset, sampler=ShardSampler(len(dataset)))
    keep = model.output_keys()
    chunks: dict[str, list[Tensor]] = {}
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            with precision_context(model):
                outputs = model.forward_eval(batch)
            outputs = {k: v for k, v in outputs.items() if k in keep}
            outputs["labels"] = batch["label"]
            outputs["index"] = batch["index"]
            for key, value in outputs.items():
                chunks.setdefault(key, []).append(value.detach().float() if value.is_floating_point() else value)
    finally:
        model.train(was_training)
    if not chunks:  # this rank got no samples (tiny set, many ranks): contribute empty tensors
        with precision_context(model):
            probe = model.forward_eval({k: v[:1].to(device) for k, v in _first_batch(datamodule, dataset).items()})
        chunks = {k: [v[:0].float()] for k, v in probe.items() if k in keep}
        chunks["labels"] = [torch.zeros(0, dtype=torch.long, device=device)]
        chunks["index"] = [torch.zeros(0, dtype=torch.long, device=device)]
    local = {key: torch.cat(values) for key, values in chunks.items()}
    gathered = gather_by_index(local, backend_device=device)
    if len(gathered["index"]) != len(dataset):
        raise RuntimeError(f"evaluated {len(gathered['index'])} samples of a set of {len(dataset)}")
    check_finite_outputs(model, {k: v for k, v in gathered.items() if k in keep}, set_name)
    return gathered


class _CapturedForwards:
    """The per-batch ``forward_eval`` outputs of one test epoch, recorded by an instance-level wrapper.

    ``valid`` turns false as soon as a call cannot be one batch of the ID test set (no ``index`` or
    ``label``, an output missing or not one row per sample); the outputs are then never used."""

    def __init__(self, model: OODMethod) -> None:
        self.keys = set(model.output_keys())
        self.chunks: list[dict[str, Tensor]] = []
        self.valid = True
        original: Callable[[dict[str, Tensor]], dict[str, Tensor]] = model.forward_eval

        def forward_eval(batch: dict[str, Tensor]) -> dict[str, Tensor]:
            outputs = original(batch)
            self.record(batch, outputs)
            return outputs

        self.wrapper = forward_eval

    def record(self, batch: Any, outputs: Mapping[str, Tensor]) -> None:
        if not self.valid:
            return
        index = batch.get("index") if isinstance(batch, Mapping) else None
        labels = batch.get("label") if isinstance(batch, Mapping) else None
        if not isinstance(index, Tensor) or not isinstance(labels, Tensor) or not self.keys <= set(outputs):
            self.valid = False
            return
        chunk = {k: outputs[k].detach() for k in self.keys}
        chunk = {k: v.float() if v.is_floating_point() else v for k, v in chunk.items()}
        chunk["labels"], chunk["index"] = labels, index
        if any(v.ndim == 0 or v.shape[0] != index.shape[0] for v in chunk.values()):
            self.valid = False
            return
        self.chunks.append(chunk)


#: the capture of each model's running test epoch (weak: a model dropped mid-test leaves nothing behind)
_CAPTURES: weakref.WeakKeyDictionary[OODMethod, _CapturedForwards] = weakref.WeakKeyDictionary()


class CaptureTestOutputs(pl.Callback):
    """Record the test loop's ``forward_eval`` outputs so that the OOD evaluation at the end of the test
    epoch reuses them for the ID test set (:func:`captured_test_outputs`) instead of forwarding it again.

    Installs a wrapper around the module's ``forward_eval`` (an instance attribute, so ``test_step``'s
    ``self.forward_eval(batch)`` goes through it) from ``on_test_epoch_start`` to ``on_test_end``. Added
    to every ``RobustTrainer``; with a plain ``Trainer`` the evaluation simply forwards the set itself.
    """

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(pl_module, OODMethod):
            self._remove(pl_module)
            capture = _CapturedForwards(pl_module)
            pl_module.forward_eval = capture.wrapper  # type: ignore[method-assign]
            _CAPTURES[pl_module] = capture

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove(pl_module)

    @staticmethod
    def _remove(pl_module: pl.LightningModule) -> None:
        capture = _CAPTURES.pop(pl_module, None) if isinstance(pl_module, OODMethod) else None
        if capture is not None and pl_module.__dict__.get("forward_eval") is capture.wrapper:
            del pl_module.forward_eval


def _all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """``flag`` on every rank (a collective: every rank must call it)."""
    _, world_size = world()
    if world_size == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def captured_test_outputs(model: OODMethod, datamodule: OODDataModule, device: torch.device) -> dict[str, Tensor] | None:
    """The running test loop's outputs over the full ID test set, gathered and ordered by index like
    :func:`collect_outputs`'s, or ``None`` when there are none to reuse (then the caller forwards the set).

    Not reused for a method that overrides ``fit_reference`` (its outputs may depend on the fit, which
    comes after the test loop). Under DDP, Lightning's ``DistributedSampler`` pads the ranks with repeats of the first samples; the
    gathered repeats are dropped here (each index kept once), so every sample counts once, as in
    :func:`collect_outputs`. Within one rank an index seen twice means ``test_step`` forwarded a sample
    twice (e.g. several views): the outputs are not one forward per sample and are not used.
    Collective under DDP: every rank must call it (it does, from the same hook)."""
    capture = _CAPTURES.get(model)
    trainer = model._trainer
    # a method that overrides fit_reference may change what forward_eval returns once it is fitted (PALM's
    # probe gives its logits): the test loop ran before the fit, so its outputs are not reused
    refits = type(model).fit_reference is not OODMethod.fit_reference
    usable = (
        capture is not None and capture.valid and bool(capture.chunks) and trainer is not None and trainer.testing
        and trainer.datamodule is datamodule and set(model.output_keys()) <= capture.keys and not refits
    )
    local: dict[str, Tensor] = {}
    if usable:
        local = {key: torch.cat([c[key] for c in capture.chunks]) for key in capture.chunks[0]}
        usable = len(torch.unique(local["index"])) == len(local["index"])
    _, world_size = world()
    if not _all_ranks_agree(usable, device):
        return None
    if world_size > 1:
        local = {key: torch.cat(_all_gather_uneven(value.to(device))).cpu() for key, value in local.items()}
    order = torch.argsort(local["index"], stable=True)
    index = local["index"][order]
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    outputs = {key: value[order[first]] for key, value in local.items()}
    n = len(datamodule.test_dataset())
    if not torch.equal(outputs["index"].cpu(), torch.arange(n)):  # identical on every rank: no deadlock
        return None
    check_finite_outputs(model, {k: v for k, v in outputs.items() if k in capture.keys}, "ID test")
    return outputs


def _first_batch(datamodule: OODDataModule, dataset: Dataset) -> dict[str, Tensor]:
    return next(iter(datamodule.eval_loader(dataset)))


def check_evaluable(model: OODMethod, datamodule: OODDataModule) -> None:
    """Fail before any long computation: scores must be buildable, OOD sets present and non-empty."""
    model.build_scores()
    if not datamodule.ood_specs or not any(datamodule.ood_specs.values()):
        raise EvaluationConfigError(
            "data.ood: no OOD sets configured; add e.g. data.init_args.ood.far.<name>: {source: npz, path: ...}"
        )


def tune_on_ood_val(
    model: OODMethod, datamodule: OODDataModule, device: torch.device, reference: dict[str, Tensor] | None
) -> dict[str, dict[str, Any]]:
    """OpenOOD's APS: pick each score's hyper-parameters by AUROC of ID-val vs the OOD *validation* sets.

    Never looks at OOD test sets. Sets the chosen hyper-parameters through the method's public
    :meth:`~robustft.methods.base.OODMethod.configure_scores`.
    """
    val = datamodule.val_dataset()
    ood_val = datamodule.ood_datasets("val")
    if val is None or not ood_val:
        raise EvaluationConfigError(
            "tuning needs an ID validation set (data.val or data.val_fraction > 0) and data.ood_val sets"
        )
    id_val = collect_outputs(model, datamodule, val, device, "ID validation")
    ood_outputs = [collect_outputs(model, datamodule, ds, device, f"OOD validation '{name}'") for name, ds in ood_val.items()]
    pooled = {k: torch.cat([o[k] for o in ood_outputs]) for k in ood_outputs[0] if k != "index"}
    head = model.classifier_head()
    head = None if head is None else (head[0].detach().float(), head[1].detach().float())
    tuned = {}
    for name in model.score_names:
        score = build_score(name, **model.score_kwargs.get(name, {}))
        if not score.search_space:
            continue
        fixed = {k: v for k, v in model.score_kwargs.get(name, {}).items() if k not in score.search_space}
        best, value = tune_score(
            name, id_val, pooled, reference, head, lambda a, b: ood_metrics(a, b)["auroc"], fixed=fixed
        )
        tuned[name] = {"hyperparameters": best, "ood_val_auroc": value}
    if tuned:
        chosen = {name: dict(entry["hyperparameters"]) for name, entry in tuned.items()}
        model.configure_scores(score_kwargs={**model.score_kwargs, **chosen})
    return tuned


def evaluate_model(
    model: OODMethod,
    datamodule: OODDataModule,
    device: torch.device | None = None,
    tune: bool = False,
    meta: dict[str, Any] | None = None,
    max_samples: int | None = None,
) -> EvaluationResult:
    """Evaluate ``model`` on the datamodule's ID test set and every OOD test set.

    Steps: fit reference statistics on ID train (only if a score needs them), optionally tune on OOD
    validation sets, run ID test and each OOD set once, compute every score's metrics per set, and
    build the report with near/far group means.

    ``max_samples`` evaluates a fixed seeded subset of at most that many samples of the ID test set
    and of each OOD set (cheap per-epoch monitoring; the report's ``n`` says how many were used).
    ``None`` evaluates the full sets, as ``test`` and ``evaluate`` always do.
    """
    started = time.perf_counter()
    device = device or next(model.parameters()).device
    check_evaluable(model, datamodule)
    reference = None
    if model.needs_reference() or (tune and any(s.needs_fit for s in model.scores.values())):
        reference = collect_outputs(model, datamodule, datamodule.reference_dataset(), device, "ID reference (train)")
    tuned = tune_on_ood_val(model, datamodule, device, reference) if tune else {}
    model.fit_reference(reference)

    id_outputs = captured_test_outputs(model, datamodule, device) if max_samples is None else None
    if id_outputs is None:  # not inside a test loop (per-epoch evaluation, plain Trainer): one pass here
        id_outputs = collect_outputs(
            model, datamodule, sample_eval_set(datamodule.test_dataset(), max_samples), device, "ID test"
        )
    id_scores = model.ood_scores(id_outputs)
    summaries: dict[str, Any] = {}
    if (summary := model.summarize_outputs(id_outputs)) is not None:
        summaries["id"] = summary
    correct = int((id_outputs["logits"].argmax(1) == id_outputs["labels"]).sum().item())
    id_acc = correct / len(id_outputs["labels"])
    per_set: dict[str, dict[str, dict[str, float]]] = {}
    all_ood_scores: dict[str, dict[str, Tensor]] = {}
    for name, dataset in datamodule.ood_datasets("test").items():
        outputs = collect_outputs(model, datamodule, sample_eval_set(dataset, max_samples), device, f"OOD '{name}'")
        scores = model.ood_scores(outputs)
        if (summary := model.summarize_outputs(outputs)) is not None:
            summaries[name] = summary
        all_ood_scores[name] = scores
        per_set[name] = {
            score: {**ood_metrics(id_scores[score], values), "n": len(values)} for score, values in scores.items()
        }
    _, world_size = world()
    meta = {
        "method": f"{type(model).__module__}.{type(model).__qualname__}",
        "default_score": model.default_score,
        "scores": list(model.score_names),
        "score_kwargs": {k: dict(v) for k, v in model.score_kwargs.items()},
        "world_size": world_size,
        "seconds": round(time.perf_counter() - started, 3),
        **(meta or {}),
    }
    if max_samples is not None:
        meta["max_samples_per_set"] = max_samples
    id_source = getattr(model, "id_accuracy_source", None)  # e.g. PALM: a linear probe, not the method's own head
    if id_source:
        meta["id_accuracy"] = str(id_source)
    if tuned:
        meta["tuned_on_ood_val"] = tuned
    if summaries:
        meta["set_summaries"] = summaries
    report = build_report(id_acc, len(id_outputs["labels"]), per_set, datamodule.ood_groups, meta)
    return EvaluationResult(report, id_scores, all_ood_scores, tuned)
