"""WiSE-FT / BANG at the end of ``fit``: interpolate the weights at the start of fit (θ0) with the
fine-tuned weights (θ1), evaluate every α, write the table / plot, optionally save one α.

The same sweep as ``python -m robustft average`` (:mod:`robustft.evaluation.weight_space`); use the
callback when θ0 is simply "the model before this fit" (pre-trained backbone + pre-trained or
zero-shot head) and the subcommand when the endpoints are separate checkpoints.

Not to be confused with Lightning's own ``lightning.pytorch.callbacks.WeightAveraging`` (EMA / SWA
during training): name this one by its full path, ``robustft.callbacks.WeightAveraging``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from robustft.callbacks.output_dir import resolve_output_dir
from robustft.data.datamodule import OODDataModule
from robustft.data.shifts import DEFAULT_CORRUPTIONS, check_projection, shifted_test_sets
from robustft.data.sources import DatasetSpec
from robustft.evaluation.weight_space import (
    DEFAULT_ALPHAS,
    SweepResult,
    SweepSettings,
    model_state,
    run_sweep,
    save_averaged_checkpoint,
    write_sweep,
)
from robustft.methods.base import OODMethod


class WeightAveraging(pl.Callback):
    """Weight-space ensembles of the initial and fine-tuned model after ``fit``.

    Args:
        alphas: interpolation weights of the fine-tuned model (0 = initial, 1 = fine-tuned).
        report_dir: output folder (default ``<log_dir>/average``).
        save_alpha: ``None``, a number, ``best_val`` or ``best_shifted`` (oracle); the chosen model is
            saved as ``<report_dir>/averaged_alpha<α>.ckpt`` (a normal Lightning checkpoint).
        corruptions: on-the-fly corruptions of the ID test set (``gaussian_noise``, ``gaussian_blur``,
            ``contrast``); ``[]`` for none.
        severities: CIFAR-10-C severities (1-5) of each corruption.
        shifted_sets: extra ID-labelled shifted sets ``{name: dataset spec}`` (the ID classes or a subset).
        shifted_projection: ``subset`` (argmax over a subset set's classes only, WiSE-FT's ImageNet-R/-A
            convention) or ``full`` (argmax over all ID classes).
        head_temperature: BANG scaling of the fine-tuned head: a number, ``nll`` or ``balance``.
        bn_recalibration_batches: re-estimate BatchNorm statistics of each averaged model on this many
            training batches (0 = keep the averaged statistics).
        tune: tune score hyper-parameters on the OOD validation sets for every α.
            The sweep runs at the end of training (``on_train_end``), on the training device and in the
            trainer's precision; its files (and the chosen model's checkpoint) are written atomically.
        restore: after the sweep keep the ``finetuned`` weights in the module (default) or the ``chosen`` α.
    """

    def __init__(
        self,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        report_dir: str | None = None,
        save_alpha: float | str | None = None,
        corruptions: Sequence[str] = DEFAULT_CORRUPTIONS,
        severities: Sequence[int] = (3,),
        shifted_sets: dict[str, DatasetSpec] | None = None,
        head_temperature: float | str | None = None,
        bn_recalibration_batches: int = 0,
        tune: bool = False,
        restore: str = "finetuned",
        shifted_projection: str = "subset",
    ) -> None:
        super().__init__()
        if restore not in ("finetuned", "chosen"):
            raise ValueError(f"WeightAveraging.restore must be 'finetuned' or 'chosen', got '{restore}'")
        self.shifted_projection = check_projection(shifted_projection, "WeightAveraging.shifted_projection")
        self.alphas = list(alphas)
        self.report_dir = report_dir
        self.save_alpha = save_alpha
        self.corruptions = list(corruptions)
        self.severities = list(severities)
        self.shifted_sets = dict(shifted_sets or {})
        self.head_temperature = head_temperature
        self.bn_recalibration_batches = bn_recalibration_batches
        self.tune = tune
        self.restore = restore
        self.theta0: dict[str, Tensor] | None = None
        self.last_result: SweepResult | None = None
        self.checkpoint_path: Path | None = None
        self._resolved_report_dir: Path | None = None

    def _report_dir(self, trainer: pl.Trainer) -> Path:
        """Resolved once in ``on_fit_start`` on every rank (``trainer.log_dir`` broadcasts)."""
        if self._resolved_report_dir is None:
            self._resolved_report_dir = resolve_output_dir(trainer, self.report_dir, "average")
        return self._resolved_report_dir

    # θ0 travels in checkpoints so that `fit --ckpt_path last` still averages with the true start
    def state_dict(self) -> dict[str, Any]:
        return {"theta0": self.theta0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.theta0 = state_dict.get("theta0")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, OODMethod):
            raise TypeError(f"WeightAveraging needs an OODMethod, got {type(pl_module).__name__}")
        self._resolved_report_dir = None
        self._report_dir(trainer)  # every rank, before any rank-0-only branch
        if self.theta0 is None:
            if trainer.ckpt_path is not None:
                rank_zero_warn(
                    "WeightAveraging: resuming from a checkpoint without the callback's θ0; the resumed "
                    "weights are used as θ0, which is not the pre-trained model"
                )
            self.theta0 = model_state(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The sweep, on the training device and in the training precision, with every rank alive.

        ``on_fit_end`` would be too late: Lightning calls it after the strategy's teardown, which has
        moved the module to the CPU (and, under DDP, the evaluation gathers need every rank)."""
        if self.theta0 is None:
            return
        datamodule = trainer.datamodule
        if not isinstance(datamodule, OODDataModule):
            raise TypeError("WeightAveraging needs an OODDataModule as the trainer's datamodule")
        theta1 = model_state(pl_module)
        settings = SweepSettings(
            alphas=self.alphas,
            shifted=shifted_test_sets(datamodule, self.corruptions, self.severities, self.shifted_sets),
            shifted_projection=self.shifted_projection,
            head_temperature=self.head_temperature,
            bn_recalibration_batches=self.bn_recalibration_batches,
            tune=self.tune,
            save_alpha=self.save_alpha,
        )
        meta = {"theta0": "weights at the start of fit", "theta1": "weights at the end of fit",
                "global_step": trainer.global_step}
        device = trainer.strategy.root_device
        self.last_result = None
        try:
            result = run_sweep(pl_module, datamodule, self.theta0, theta1, settings, device, meta)
            self.last_result = result
            directory = self._report_dir(trainer)
            # every rank: gathering the module's state may be collective under sharded strategies
            template = self._template(trainer) if result.chosen_state is not None else None
            if trainer.is_global_zero:
                if result.chosen_state is not None:
                    self.checkpoint_path = save_averaged_checkpoint(pl_module, result, directory, template)
                write_sweep(result, directory)
                rank_zero_info(f"WeightAveraging: table and plot in {directory}")
            trainer.strategy.barrier("WeightAveraging.on_train_end")
        finally:
            if self.restore == "finetuned" or self.last_result is None or self.last_result.chosen_state is None:
                pl_module.load_state_dict(theta1)
            else:
                pl_module.load_state_dict(self.last_result.chosen_state)

    @staticmethod
    def _template(trainer: pl.Trainer) -> dict[str, Any]:
        """What a checkpoint of this run holds besides the weights (hyper-parameters, versions, the
        robustft entry); :func:`averaged_checkpoint` drops the optimiser and loop state."""
        return {k: v for k, v in trainer._checkpoint_connector.dump_checkpoint(weights_only=True).items()
                if k != "state_dict"}
