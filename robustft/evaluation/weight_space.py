"""WiSE-FT / BANG weight-space ensembles of two checkpoints: the library function behind
``python -m robustft average`` (:meth:`robustft.cli.RobustTrainer.average`, the command) and the
checkpoint of the chosen α.

The parts live along their seams: :mod:`robustft.evaluation.sweep` (build ``θ_α``, evaluate every α,
choose one), :mod:`robustft.evaluation.bang` (BANG's head temperature) and
:mod:`robustft.evaluation.sweep_report` (table files and plot). Their public names are re-exported
here, so ``from robustft.evaluation.weight_space import run_sweep`` keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robustft.averaging import interpolate_state_dicts
from robustft.data.datamodule import OODDataModule
from robustft.data.shifts import check_projection
from robustft.evaluation.bang import (
    TEMPERATURE_RULES,
    balance_temperature,
    fit_temperature,
    head_keys,
    resolve_temperature,
    scale_head,
)
from robustft.evaluation.sweep import (
    DEFAULT_ALPHAS,
    SELECTION_RULES,
    SweepResult,
    SweepSettings,
    _resolve_alphas,
    build_model_at_alpha,
    check_matches_model,
    load_endpoint,
    model_state,
    recalibrate_batchnorm,
    run_sweep,
)
from robustft.evaluation.sweep_report import plot_sweep, write_sweep
from robustft.io import atomic_torch_save
from robustft.methods.base import CHECKPOINT_KEY, ConfigMismatchError, OODMethod, method_path

__all__ = [
    "DEFAULT_ALPHAS",
    "SELECTION_RULES",
    "TEMPERATURE_RULES",
    "SweepResult",
    "SweepSettings",
    "average_checkpoints",
    "averaged_checkpoint",
    "balance_temperature",
    "build_model_at_alpha",
    "check_matches_model",
    "fit_temperature",
    "head_keys",
    "load_endpoint",
    "model_state",
    "plot_sweep",
    "recalibrate_batchnorm",
    "resolve_temperature",
    "run_sweep",
    "save_averaged_checkpoint",
    "scale_head",
    "write_sweep",
]


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



def save_averaged_checkpoint(
    model: OODMethod,
    result: SweepResult,
    directory: str | Path,
    template: Mapping[str, Any] | None = None,
) -> Path:
    """Write the chosen α's model as ``<directory>/averaged_alpha<α>.ckpt`` (atomically) and record its
    path in ``result.meta["checkpoint"]``. ``template``: the checkpoint whose metadata it keeps."""
    if result.chosen_state is None or result.chosen_alpha is None:
        raise ValueError("the sweep chose no α (save_alpha is None): there is no averaged model to save")
    info = {k: result.meta.get(k) for k in ("theta0", "theta1", "head_temperature", "bn_recalibration_batches")}
    info["alpha"] = result.chosen_alpha
    path = Path(directory) / f"averaged_alpha{result.chosen_alpha:.2f}.ckpt"
    atomic_torch_save(averaged_checkpoint(model, result.chosen_state, template, info), path)
    result.meta["checkpoint"] = str(path)
    return path


# --------------------------------------------------------------------------------------------------
# the library function of the ``average`` subcommand


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

    The datamodule prepares images with its ``preprocess`` (the CLI passes the model's in); when it has
    none, it is given ``model.preprocess`` through :meth:`~robustft.data.OODDataModule.set_preprocess`.
    """
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
    if datamodule.preprocess is None:  # the CLI passes it in; a Python caller may not have
        datamodule.set_preprocess(model.preprocess)
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
    if result.chosen_state is not None:
        template = torch.load(finetuned_ckpt, map_location="cpu", weights_only=True)
        template = template if isinstance(template, Mapping) and "state_dict" in template else None
        save_averaged_checkpoint(model, result, directory, template)
    write_sweep(result, directory)
    return result
