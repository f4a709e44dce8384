"""WiSE-FT / BANG α-sweeps: build ``θ_α = (1-α) θ0 + α θ1``, evaluate it, tabulate, plot, save one.

Shared by ``python -m robustft average`` (:meth:`robustft.cli.RobustTrainer.average`) and the
:class:`~robustft.callbacks.WeightAveraging` callback, so the two build and score models identically.
Averaging itself is :func:`robustft.averaging.interpolate_state_dicts` (key/shape/dtype checks, exact
endpoints); evaluation is :func:`robustft.evaluation.engine.evaluate_model` (ID test + OOD sets) and
:func:`~robustft.evaluation.engine.collect_outputs` (ID validation and the covariate-shifted sets of
:mod:`robustft.data.shifts`) -- there is no second evaluation loop here.

Per α the table holds: ID test accuracy; ID validation accuracy, NLL, mean max-softmax and mean logit
norm (held-out data, the only data on which α or a temperature may be chosen); accuracy on every
shifted set and their mean; AUROC of the method's default score on every OOD set and group.

BANG's scaling variant (spec section 3, "BANG-scale", our rule): the fine-tuned head ``(W1, b1)`` is
divided by a temperature T before interpolating. ``head_temperature`` is a number, ``nll`` (T minimising
the NLL of θ1 on ID validation: temperature scaling) or ``balance`` (T = mean ‖f(x; θ1)‖ / mean
‖f(x; θ0)‖ on ID validation). Only the head is scaled, so for end-to-end fine-tuning this approximates
scaling the fine-tuned model's output.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from robustft.averaging import interpolate_state_dicts, load_state_dict_file, weighted_average
from robustft.data.datamodule import OODDataModule
from robustft.data.shifts import check_projection, project_logits
from robustft.evaluation.engine import collect_outputs, evaluate_model
from robustft.methods.base import CHECKPOINT_KEY, ConfigMismatchError, OODMethod, method_path

__all__ = [
    "DEFAULT_ALPHAS",
    "SweepResult",
    "SweepSettings",
    "average_checkpoints",
    "averaged_checkpoint",
    "balance_temperature",
    "build_model_at_alpha",
    "check_matches_model",
    "fit_temperature",
    "load_endpoint",
    "model_state",
    "plot_sweep",
    "recalibrate_batchnorm",
    "run_sweep",
    "scale_head",
    "write_sweep",
]

DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(i / 10, 1) for i in range(11))
SELECTION_RULES = ("best_shifted", "best_val")
TEMPERATURE_RULES = ("nll", "balance")


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
# BANG head temperature


def head_keys(model: OODMethod) -> tuple[str, str]:
    keys = getattr(model, "head_state_keys", None)
    if keys is None:
        raise ConfigMismatchError(
            f"head_temperature needs a method with a linear head (head_state_keys), {type(model).__name__} has none"
        )
    return tuple(keys)


def scale_head(state: Mapping[str, Tensor], keys: Sequence[str], temperature: float) -> dict[str, Tensor]:
    """A copy of ``state`` whose head tensors are divided by ``temperature`` (T = 1: unchanged copy)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"head temperature must be a finite positive number, got {temperature}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"head keys {missing} not in the state dict")
    out = dict(state)
    if temperature != 1.0:
        for k in keys:
            out[k] = (state[k].double() / temperature).to(state[k].dtype)
    return out


def fit_temperature(logits: Tensor, labels: Tensor, low: float = 0.05, high: float = 20.0, steps: int = 80) -> float:
    """Temperature scaling: the T in [low, high] minimising ``CE(logits / T, labels)`` (golden section on log T)."""
    logits, labels = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels))

    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    return math.exp((a + b) / 2)


def balance_temperature(logits1: Tensor, logits0: Tensor) -> float:
    """BANG's balance: mean logit norm of θ1 over that of θ0 (on the same ID validation images)."""
    return float(logits1.double().norm(dim=1).mean() / logits0.double().norm(dim=1).mean())


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


def _resolve_temperature(
    setting: float | str | None,
    model: OODMethod,
    datamodule: OODDataModule,
    theta0: Mapping[str, Tensor],
    theta1: Mapping[str, Tensor],
    device: torch.device,
) -> float | None:
    if setting is None:
        return None
    if not isinstance(setting, str):
        return float(setting)
    if setting not in TEMPERATURE_RULES:
        raise ValueError(f"head_temperature: unknown rule '{setting}'; give a number or one of {', '.join(TEMPERATURE_RULES)}")
    val = datamodule.val_dataset()
    if val is None:
        raise ConfigMismatchError(
            f"head_temperature: {setting} is chosen on ID validation data; set data.val or data.val_fraction > 0"
        )
    build_model_at_alpha(model, theta0, theta1, 1.0)
    out1 = collect_outputs(model, datamodule, val, device)
    if setting == "nll":
        return fit_temperature(out1["logits"], _labels(out1))
    build_model_at_alpha(model, theta0, theta1, 0.0)
    out0 = collect_outputs(model, datamodule, val, device)
    return balance_temperature(out1["logits"], out0["logits"])


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
    """Evaluate ``θ_α`` for every α; leaves ``model`` holding the *last* α's weights (callers restore)."""
    alphas = _resolve_alphas(settings.alphas, settings.save_alpha)
    interpolate_state_dicts(theta0, theta1, 0.5)  # key/shape/dtype check up front, names offending keys
    check_matches_model(model, theta1, "θ1")
    temperature = _resolve_temperature(settings.head_temperature, model, datamodule, theta0, theta1, device)
    theta1_used = theta1 if temperature is None else scale_head(theta1, head_keys(model), temperature)
    rows, reports = [], []
    for alpha in alphas:
        build_model_at_alpha(model, theta0, theta1_used, alpha)
        recalibrate_batchnorm(model, datamodule, settings.bn_recalibration_batches, device)
        row, report, _ = _evaluate_alpha(model, datamodule, device, settings, alpha)
        rows.append(row)
        reports.append(report)
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


# --------------------------------------------------------------------------------------------------
# outputs


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, float) else ("" if value is None else str(value))


def _markdown(result: SweepResult) -> str:
    rows = result.rows
    cols = _columns(rows)
    shown = [c for c in cols if c not in ("score", "val_nll", "val_logit_norm")]
    titles = {
        "alpha": "α",
        "id_acc": "ID acc",
        "val_acc": "val acc",
        "val_msp": "val mean MSP",
        "id_msp": "ID mean MSP",
        "shift_mean": "shifted mean",
    }
    score = next((r["score"] for r in rows if "score" in r), None)
    header = [titles.get(c, c.replace("shift/", "").replace("auroc/", f"AUROC {score} ")) for c in shown]
    lines = [
        "# Weight-space ensemble sweep (WiSE-FT / BANG)",
        "",
        "Accuracies, mean max-softmax (MSP) and AUROC in percent; shifted columns are ID-labelled shifted sets.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---:"] * len(header)) + "|",
    ]
    for r in rows:
        cells = [f"{r['alpha']:g}" if c == "alpha" else _pct(r.get(c)) for c in shown]
        if result.chosen_alpha is not None and r["alpha"] == result.chosen_alpha:
            cells[0] = f"**{cells[0]}** (saved)"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Meta", "", "```json", json.dumps(result.meta, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in r.items()})
    return buffer.getvalue()


_COLORS = [(31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194),
           (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (152, 223, 138), (255, 187, 120),
           (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229)]
_HIGHLIGHT = {"ID test": (0, 0, 0), "shifted mean": (214, 39, 40)}


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | Path, size: tuple[int, int] = (760, 480)) -> Path:
    """PNG line plot of ID accuracy and every shifted-set accuracy (and their mean) against α (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont

    series = {"ID test": [r.get("id_acc") for r in rows]}
    for key in _columns(rows):
        if key.startswith("shift/"):
            series[key.removeprefix("shift/")] = [r.get(key) for r in rows]
    if any("shift_mean" in r for r in rows):
        series["shifted mean"] = [r.get("shift_mean") for r in rows]
    alphas = [float(r["alpha"]) for r in rows]
    values = [v for vs in series.values() for v in vs if v is not None]
    lo, hi = min(values), max(values)
    pad = max(0.01, 0.05 * (hi - lo))
    lo, hi = max(0.0, lo - pad), min(1.0, hi + pad)
    if hi <= lo:
        lo, hi = max(0.0, lo - 0.05), min(1.0, hi + 0.05)
    w, h = size
    left, right, top, bottom = 60, 190, 30, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    def xy(a: float, v: float) -> tuple[float, float]:
        x = left + (a - 0.0) / 1.0 * (w - left - right)
        y = h - bottom - (v - lo) / (hi - lo) * (h - top - bottom)
        return x, y

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(6):
        a = i / 5
        x, _ = xy(a, lo)
        draw.line([x, h - bottom, x, h - bottom + 5], fill="black")
        draw.text((x - 8, h - bottom + 8), f"{a:.1f}", fill="black", font=font)
        v = lo + (hi - lo) * i / 5
        _, y = xy(0.0, v)
        draw.line([left - 5, y, left, y], fill="black")
        draw.line([left + 1, y, w - right - 1, y], fill=(230, 230, 230))
        draw.text((8, y - 6), f"{100 * v:.1f}%", fill="black", font=font)
    draw.text(((left + w - right) / 2 - 50, h - 22), "alpha (0 = initial, 1 = fine-tuned)", fill="black", font=font)
    draw.text((left, 8), "accuracy vs alpha (WiSE-FT / BANG)", fill="black", font=font)
    others = iter(_COLORS * (1 + len(series) // len(_COLORS)))
    for i, (name, vs) in enumerate(series.items()):
        color = _HIGHLIGHT.get(name) or next(others)
        points = [xy(a, v) for a, v in zip(alphas, vs, strict=True) if v is not None]
        if len(points) > 1:
            draw.line(points, fill=color, width=4 if name in _HIGHLIGHT else 2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        ly = top + 10 + 16 * i
        draw.line([w - right + 12, ly + 6, w - right + 32, ly + 6], fill=color, width=3)
        draw.text((w - right + 38, ly), name[:24], fill="black", font=font)
    path = Path(path)
    image.save(path, format="PNG")
    return path


def write_sweep(result: SweepResult, report_dir: str | Path) -> dict[str, Path]:
    """Write ``average.json`` (rows + full per-α reports + meta), ``average.csv``, ``average.md`` and
    ``average.png`` into ``report_dir`` (created if needed)."""
    from robustft.ood.report import check_writable

    directory = check_writable(report_dir)
    payload = {"rows": result.rows, "reports": result.reports, "meta": result.meta}
    paths = {kind: directory / f"average.{kind}" for kind in ("json", "csv", "md", "png")}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    paths["csv"].write_text(_csv(result.rows), encoding="utf-8")
    paths["md"].write_text(_markdown(result), encoding="utf-8")
    plot_sweep(result.rows, paths["png"])
    return paths


def averaged_checkpoint(
    model: OODMethod, state: Mapping[str, Tensor], template: Mapping[str, Any] | None, info: Mapping[str, Any]
) -> dict[str, Any]:
    """A Lightning checkpoint of the averaged model, loadable by ``evaluate --ckpt_path`` and ``test``.

    Built from ``template`` (the fine-tuned checkpoint: version, hyper-parameters, robustft entry)
    without its optimiser / scheduler / loop / callback state, with ``state`` as weights and the
    averaging provenance under ``robustft.averaging``.
    """
    import lightning

    drop = {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "MixedPrecision"}
    ckpt: dict[str, Any] = {k: v for k, v in (template or {}).items() if k not in drop}
    ckpt.setdefault("epoch", 0)
    ckpt.setdefault("global_step", 0)
    ckpt.setdefault("pytorch-lightning_version", lightning.__version__)
    if "hyper_parameters" not in ckpt:
        ckpt["hyper_parameters"] = dict(model.hparams)
    ckpt["state_dict"] = dict(state)
    entry = dict(ckpt.get(CHECKPOINT_KEY) or {"method": method_path(type(model)), "num_classes": model.num_classes})
    entry["averaging"] = dict(info)
    ckpt[CHECKPOINT_KEY] = entry
    return ckpt


# --------------------------------------------------------------------------------------------------
# the ``average`` subcommand


def average_checkpoints(
    model: OODMethod,
    datamodule: OODDataModule,
    finetuned_ckpt: str | Path,
    zero_shot_ckpt: str | Path | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    report_dir: str | Path = "reports/average",
    save_alpha: float | str | None = None,
    corruptions: Sequence[str] = (),
    severities: Sequence[int] = (3,),
    shifted_sets: Mapping[str, Any] | None = None,
    head_temperature: float | str | None = None,
    bn_recalibration_batches: int = 0,
    tune: bool = False,
    device: torch.device | None = None,
    shifted_projection: str = "subset",
) -> SweepResult:
    """Everything ``python -m robustft average`` does, on one process (arguments as documented there).

    θ1 is ``finetuned_ckpt``; θ0 is ``zero_shot_ckpt`` or, when omitted, ``model`` exactly as configured
    (pre-trained backbone + pre-trained / zero-shot head, built like ``fit`` builds it). Writes the
    table files and plot into ``report_dir`` and, when ``save_alpha`` is set, the chosen model as
    ``averaged_alpha<α>.ckpt`` there.
    """
    from robustft.checkpointing import AtomicCheckpointIO
    from robustft.data.shifts import shifted_test_sets
    from robustft.ood.report import check_writable

    directory = check_writable(report_dir)
    _resolve_alphas(alphas, save_alpha)  # refuse a bad grid / rule before any work
    check_projection(shifted_projection, "--shifted_projection")
    for role, path in (("--finetuned_ckpt", finetuned_ckpt), ("--zero_shot_ckpt", zero_shot_ckpt)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{role}: '{path}' is not a file; give a checkpoint written by fit")
    theta0 = model_state(model) if zero_shot_ckpt is None else load_endpoint(zero_shot_ckpt, model, "--zero_shot_ckpt")
    theta1 = load_endpoint(finetuned_ckpt, model, "--finetuned_ckpt")
    interpolate_state_dicts(theta0, theta1, 0.5)  # mismatched checkpoints fail before any data is loaded
    device = device or next(model.parameters()).device
    override = datamodule.preprocess_override
    if override is None:  # no trainer is attached: the transforms must still follow the model's backbone
        datamodule.preprocess_override = model.preprocess
    try:
        datamodule.setup("test")
        if datamodule.num_classes != model.num_classes:
            raise ConfigMismatchError(
                f"model.num_classes is {model.num_classes} but data.train has {datamodule.num_classes} classes"
            )
        model.to(device)
        settings = SweepSettings(
            alphas=alphas,
            shifted=shifted_test_sets(datamodule, corruptions, severities, shifted_sets),
            shifted_projection=shifted_projection,
            head_temperature=head_temperature,
            bn_recalibration_batches=bn_recalibration_batches,
            tune=tune,
            save_alpha=save_alpha,
        )
        meta = {
            "theta0": str(zero_shot_ckpt) if zero_shot_ckpt is not None else "the configured model's initial weights",
            "theta1": str(finetuned_ckpt),
            "corruptions": list(corruptions),
            "severities": list(severities),
            "shifted_projection": shifted_projection,
        }
        result = run_sweep(model, datamodule, theta0, theta1, settings, device, meta)
    finally:
        datamodule.preprocess_override = override
    if result.chosen_state is not None:
        template = torch.load(finetuned_ckpt, map_location="cpu", weights_only=True)
        template = template if isinstance(template, Mapping) and "state_dict" in template else None
        info = {k: result.meta[k] for k in ("theta0", "theta1", "head_temperature", "bn_recalibration_batches")}
        info["alpha"] = result.chosen_alpha
        path = directory / f"averaged_alpha{result.chosen_alpha:.2f}.ckpt"
        AtomicCheckpointIO().save_checkpoint(averaged_checkpoint(model, result.chosen_state, template, info), path)
        result.meta["checkpoint"] = str(path)
    write_sweep(result, directory)
    return result
