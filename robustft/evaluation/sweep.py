"""WiSE-FT / BANG α-sweeps: build ``θ_α = (1-α) θ0 + α θ1``, evaluate it, choose one α.

Shared by ``python -m robustft average`` (:func:`robustft.evaluation.weight_space.average_checkpoints`)
and the :class:`~robustft.callbacks.WeightAveraging` callback, so the two build and score models
identically. Averaging itself is :func:`robustft.averaging.interpolate_state_dicts` (key/shape/dtype
checks, exact endpoints); evaluation is :func:`robustft.evaluation.engine.evaluate_model` (ID test + OOD
sets) and :func:`~robustft.evaluation.engine.collect_outputs` (ID validation and the covariate-shifted
sets of :mod:`robustft.data.shifts`) -- there is no second evaluation loop here. BANG's head temperature
is :mod:`robustft.evaluation.bang`; the table and plot are :mod:`robustft.evaluation.sweep_report`.

Per α the table holds: ID test accuracy; ID validation accuracy, NLL, mean max-softmax and mean logit
norm (held-out data, the only data on which α or a temperature may be chosen); accuracy on every
shifted set and their mean; AUROC of the method's default score on every OOD set and group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from robustft.averaging import interpolate_state_dicts, load_state_dict_file, weighted_average
from robustft.data.datamodule import OODDataModule
from robustft.data.shifts import project_logits
from robustft.evaluation.bang import head_keys, resolve_temperature, scale_head
from robustft.evaluation.engine import collect_outputs, evaluate_model, precision_context
from robustft.methods.base import CHECKPOINT_KEY, ConfigMismatchError, OODMethod, method_path

__all__ = [
    "DEFAULT_ALPHAS",
    "SELECTION_RULES",
    "SweepResult",
    "SweepSettings",
    "build_model_at_alpha",
    "check_matches_model",
    "load_endpoint",
    "model_state",
    "recalibrate_batchnorm",
    "run_sweep",
]

DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(i / 10, 1) for i in range(11))
SELECTION_RULES = ("best_shifted", "best_val")


# --------------------------------------------------------------------------------------------------
# endpoints


def model_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of ``model.state_dict()`` (θ0 = the model as configured, before any step)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _checkpoint_info(path: Path) -> dict | None:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint (or unreadable): load_state_dict_file reports it properly
        return None
    info = obj.get(CHECKPOINT_KEY) if isinstance(obj, Mapping) else None
    return dict(info) if isinstance(info, Mapping) else None


def load_endpoint(path: str | Path, model: OODMethod, role: str) -> dict[str, Tensor]:
    """Read θ from a checkpoint for ``model``: a robustft checkpoint of the same method, or a plain state
    dict with the model's keys. A checkpoint of another method is refused before any key comparison."""
    path = Path(path)
    info = _checkpoint_info(path) if path.is_file() else None
    if info is not None and info.get("method") != method_path(type(model)):
        raise ConfigMismatchError(
            f"{role} '{path}' is a checkpoint of {info.get('method')} but the model is "
            f"{method_path(type(model))}; WiSE-FT/BANG average two checkpoints of the same method "
            f"(set model.class_path: {info.get('method')} or give a checkpoint of this method)"
        )
    return load_state_dict_file(path)


def check_matches_model(model: torch.nn.Module, state: Mapping[str, Tensor], name: str) -> None:
    """Raise :class:`~robustft.averaging.StateDictMismatchError` naming the keys/shapes that differ."""
    weighted_average([model.state_dict(), state], [0.0, 1.0], names=["the configured model", name])


def build_model_at_alpha(
    model: OODMethod, theta0: Mapping[str, Tensor], theta1: Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """Load ``(1-α) θ0 + α θ1`` into ``model`` (strictly) and return the averaged state dict.

    α = 0 / 1 load bit-exact copies of θ0 / θ1, so the endpoints reproduce the initial and fine-tuned
    models exactly. Mismatched checkpoints raise ``StateDictMismatchError`` naming the keys.
    """
    state = interpolate_state_dicts(theta0, theta1, alpha)
    check_matches_model(model, state, f"θ(α={alpha:g})")
    model.load_state_dict(state, strict=True)
    return state


# --------------------------------------------------------------------------------------------------
# BatchNorm


@torch.no_grad()
def recalibrate_batchnorm(model: OODMethod, datamodule: OODDataModule, num_batches: int, device: torch.device) -> int:
    """Re-estimate BatchNorm running statistics of the averaged network on ``num_batches`` training batches
    (cumulative average, as ``torch.optim.swa_utils.update_bn``). Returns the number of BN layers reset."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if num_batches <= 0 or not norms:
        return 0
    momenta = {m: m.momentum for m in norms}
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for i, batch in enumerate(datamodule.train_dataloader()):
            if i >= num_batches:
                break
            with precision_context(model):
                model.forward_eval({k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()})
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
    return len(norms)


# --------------------------------------------------------------------------------------------------
# sweep


@dataclass
class SweepSettings:
    """What to evaluate per α and which α to keep.

    ``save_alpha``: ``None`` (keep none), a number, ``best_val`` (highest ID-validation accuracy: the
    leakage-free choice) or ``best_shifted`` (highest mean shifted-set accuracy; an *oracle* choice on
    test-time shifts, as WiSE-FT's "optimal α" -- report it as such). ``shifted_projection``: how a
    shifted set of a subset of the ID classes is scored (``subset``: argmax over its classes only, the
    WiSE-FT ImageNet-R/-A convention; ``full``: argmax over all ID classes).
    """

    alphas: Sequence[float] = DEFAULT_ALPHAS
    shifted: Mapping[str, Dataset] = field(default_factory=dict)
    shifted_projection: str = "subset"
    head_temperature: float | str | None = None
    bn_recalibration_batches: int = 0
    tune: bool = False
    save_alpha: float | str | None = None


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    reports: list[dict[str, Any] | None]
    meta: dict[str, Any]
    chosen_alpha: float | None = None
    chosen_state: dict[str, Tensor] | None = None


def _labels(outputs: Mapping[str, Tensor]) -> Tensor:
    """The labels ``collect_outputs`` returned (``labels``; ``label`` in older versions of the engine)."""
    return outputs["labels"] if "labels" in outputs else outputs["label"]


def _accuracy(
    outputs: Mapping[str, Tensor], class_indices: Sequence[int] | None = None, projection: str = "subset"
) -> float:
    """Top-1 accuracy; a shifted set of a subset of the ID classes is scored through ``project_logits``."""
    logits, labels = project_logits(outputs["logits"], _labels(outputs), class_indices, projection)
    return float((logits.argmax(1) == labels).double().mean())


def _resolve_alphas(alphas: Sequence[float], save_alpha: float | str | None) -> list[float]:
    grid = [float(a) for a in alphas]
    if not grid:
        raise ValueError("alphas is empty; give at least one α in [0, 1]")
    bad = [a for a in grid if not (0.0 <= a <= 1.0)]
    if bad:
        raise ValueError(f"alphas must lie in [0, 1], got {bad}")
    if isinstance(save_alpha, str):
        if save_alpha not in SELECTION_RULES:
            raise ValueError(f"save_alpha: unknown rule '{save_alpha}'; give a number or one of {', '.join(SELECTION_RULES)}")
    elif save_alpha is not None:
        if not 0.0 <= float(save_alpha) <= 1.0:
            raise ValueError(f"save_alpha must lie in [0, 1], got {save_alpha}")
        if float(save_alpha) not in grid:
            grid.append(float(save_alpha))
    return sorted(dict.fromkeys(grid))


def _val_outputs(
    model: OODMethod,
    datamodule: OODDataModule,
    theta0: Mapping[str, Tensor],
    theta1: Mapping[str, Tensor],
    device: torch.device,
) -> Callable[[float], dict[str, Tensor]] | None:
    """``α -> ID-validation outputs of θ_α`` (for BANG's fitted temperatures), ``None`` without validation data."""
    val = datamodule.val_dataset()
    if val is None:
        return None

    def outputs_at(alpha: float) -> dict[str, Tensor]:
        build_model_at_alpha(model, theta0, theta1, alpha)
        return collect_outputs(model, datamodule, val, device, f"ID validation (α={alpha:g})")

    return outputs_at


def _evaluate_alpha(
    model: OODMethod,
    datamodule: OODDataModule,
    device: torch.device,
    settings: SweepSettings,
    alpha: float,
) -> tuple[dict[str, Any], dict[str, Any] | None, float | None]:
    row: dict[str, Any] = {"alpha": alpha}
    report = None
    id_msp = None
    if any(datamodule.ood_specs.values()):
        result = evaluate_model(model, datamodule, device, tune=settings.tune, meta={"alpha": alpha})
        report = result.report
        row["id_acc"] = report["id"]["acc"]
        if "msp" in result.id_scores:
            id_msp = float(result.id_scores["msp"].double().mean())
    else:
        row["id_acc"] = _accuracy(collect_outputs(model, datamodule, datamodule.test_dataset(), device))
    val = datamodule.val_dataset()
    if val is not None:
        out = collect_outputs(model, datamodule, val, device)
        logits = out["logits"].double()
        row["val_acc"] = _accuracy(out)
        row["val_nll"] = float(F.cross_entropy(logits, _labels(out)))
        row["val_msp"] = float(logits.softmax(dim=1).amax(dim=1).mean())
        row["val_logit_norm"] = float(logits.norm(dim=1).mean())
    if id_msp is not None:
        row["id_msp"] = id_msp
    shifted = {
        name: _accuracy(
            collect_outputs(model, datamodule, ds, device), getattr(ds, "class_indices", None), settings.shifted_projection
        )
        for name, ds in settings.shifted.items()
    }
    for name, acc in shifted.items():
        row[f"shift/{name}"] = acc
    if shifted:
        row["shift_mean"] = math.fsum(shifted.values()) / len(shifted)
    if report is not None:
        score = model.default_score if model.default_score in model.score_names else model.score_names[0]
        row["score"] = score
        for group, scores in report["groups"].items():
            row[f"auroc/{group}"] = scores[score]["auroc"]
        for set_name, scores in report["ood"].items():
            row[f"auroc/{set_name}"] = scores[score]["auroc"]
    return row, report, id_msp


def _choose(rows: Sequence[Mapping[str, Any]], rule: float | str | None) -> float | None:
    if rule is None:
        return None
    if not isinstance(rule, str):
        return float(rule)
    key = "shift_mean" if rule == "best_shifted" else "val_acc"
    if any(key not in r for r in rows):
        need = "shifted sets (corruptions or shifted_sets)" if key == "shift_mean" else "an ID validation set"
        raise ValueError(f"save_alpha: {rule} needs {need}")
    best = max(r[key] for r in rows)
    return next(r["alpha"] for r in rows if r[key] == best)  # smallest α among ties


def run_sweep(
    model: OODMethod,
    datamodule: OODDataModule,
    theta0: Mapping[str, Tensor],
    theta1: Mapping[str, Tensor],
    settings: SweepSettings,
    device: torch.device,
    meta: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Evaluate ``θ_α`` for every α; leaves ``model`` holding the *last* α's weights (callers restore).

    With ``settings.tune`` each α's scores are tuned on the OOD validation sets from the method's own
    score configuration (:meth:`~robustft.methods.base.OODMethod.configure_scores`), restored afterwards."""
    alphas = _resolve_alphas(settings.alphas, settings.save_alpha)
    interpolate_state_dicts(theta0, theta1, 0.5)  # key/shape/dtype check up front, names offending keys
    check_matches_model(model, theta1, "θ1")
    temperature = resolve_temperature(settings.head_temperature, _val_outputs(model, datamodule, theta0, theta1, device))
    theta1_used = theta1 if temperature is None else scale_head(theta1, head_keys(model), temperature)
    rows, reports = [], []
    # tuning (settings.tune) re-configures the scores per α: every α starts from, and the model ends
    # with, the method's own score configuration
    names, kwargs = list(model.score_names), {k: dict(v) for k, v in model.score_kwargs.items()}
    try:
        for alpha in alphas:
            build_model_at_alpha(model, theta0, theta1_used, alpha)
            recalibrate_batchnorm(model, datamodule, settings.bn_recalibration_batches, device)
            if settings.tune:
                model.configure_scores(names, kwargs)
            row, report, _ = _evaluate_alpha(model, datamodule, device, settings, alpha)
            rows.append(row)
            reports.append(report)
    finally:
        if settings.tune:
            model.configure_scores(names, kwargs)
    chosen = _choose(rows, settings.save_alpha)
    chosen_state = None
    if chosen is not None:
        build_model_at_alpha(model, theta0, theta1_used, chosen)
        recalibrate_batchnorm(model, datamodule, settings.bn_recalibration_batches, device)
        chosen_state = model_state(model)
    info = {
        "alphas": alphas,
        "head_temperature": temperature,
        "head_temperature_rule": settings.head_temperature if isinstance(settings.head_temperature, str) else None,
        "bn_recalibration_batches": settings.bn_recalibration_batches,
        "shifted_sets": list(settings.shifted),
        "default_score": model.default_score,
        "save_alpha": settings.save_alpha,
        "chosen_alpha": chosen,
        **dict(meta or {}),
    }
    return SweepResult(rows, reports, info, chosen, chosen_state)

