"""Per-epoch ID accuracy and OOD metrics, logged like any other metric.

``OODEvaluation`` runs in ``on_validation_epoch_end``, which Lightning calls before
``ModelCheckpoint`` decides what to save, so ``monitor: ood/far/msp/auroc`` works. It evaluates every
``every_n_epochs`` epochs and at ``test``; a checkpoint monitoring an OOD key therefore needs the
same period (or ``every_n_epochs: 1``).

Figures (ROC curves of every score per OOD set, ID-vs-OOD score histograms: :mod:`robustft.plots`) are
drawn into ``<report_dir>/figures/`` and TensorBoard for the *final* evaluation of ``fit`` and for every
``test`` / ``evaluate``; ``report.md`` links them. Drawing them costs seconds (one figure per set and
score), so per-epoch evaluations draw none unless ``plots_every_n_evaluations`` asks for it.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from robustft.callbacks.output_dir import resolve_output_dir
from robustft.callbacks.plots import write_result_figures
from robustft.checkpointing import file_sha256
from robustft.data.datamodule import OODDataModule
from robustft.evaluation.engine import EvaluationResult, check_evaluable, evaluate_model
from robustft.methods.base import OODMethod
from robustft.ood.report import check_writable, format_table, write_report


def flatten_report(report: dict) -> dict[str, float]:
    """``id/acc``, ``ood/<set>/<score>/<metric>`` and ``ood/<group>/<score>/<metric>`` scalars."""
    flat = {"id/acc": float(report["id"]["acc"])}
    for set_name, scores in report["ood"].items():
        for score, metrics in scores.items():
            for metric, value in metrics.items():
                if metric != "n":
                    flat[f"ood/{set_name}/{score}/{metric}"] = float(value)
    for group, scores in report["groups"].items():
        for score, metrics in scores.items():
            for metric, value in metrics.items():
                if metric not in ("n", "sets"):
                    flat[f"ood/{group}/{score}/{metric}"] = float(value)
    return flat


class OODEvaluation(pl.Callback):
    """Evaluate ID accuracy and OOD detection every ``every_n_epochs`` epochs and at ``test``.

    Args:
        every_n_epochs: evaluation period during ``fit`` (0 = only at ``test``).
        report_dir: where the latest report files go (default ``<log_dir>/ood_report``).
        plots: draw the figures (``figures/roc_<set>.png``, ``figures/hist_<set>_<score>.png`` beside the
            report, and the same in TensorBoard) at the end of ``fit`` and at ``test`` / ``evaluate``.
            Needs matplotlib (the ``plots`` extra); without it the figures are skipped with one warning.
        plots_every_n_evaluations: also draw them at every N-th per-epoch evaluation of ``fit``
            (0, the default: at the end only, so per-epoch evaluation pays nothing for figures).
        tune: tune score hyper-parameters on the OOD *validation* sets before each evaluation.
        epoch_max_samples: during ``fit``, evaluate a fixed seeded subset of at most this many samples
            of the ID test set and of each OOD set (the same subset every epoch), so that monitoring
            costs a fraction of an epoch; the final model is then evaluated on the full sets at the
            end of ``fit`` (report written and printed). ``test`` always uses the full sets.
            ``None`` (default): full sets every epoch.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        report_dir: str | None = None,
        plots: bool = True,
        tune: bool = False,
        epoch_max_samples: int | None = None,
        plots_every_n_evaluations: int = 0,
    ):
        super().__init__()
        if every_n_epochs < 0:
            raise ValueError(f"OODEvaluation.every_n_epochs must be >= 0, got {every_n_epochs}")
        if epoch_max_samples is not None and epoch_max_samples < 1:
            raise ValueError(f"OODEvaluation.epoch_max_samples must be >= 1 or null, got {epoch_max_samples}")
        if plots_every_n_evaluations < 0:
            raise ValueError(
                f"OODEvaluation.plots_every_n_evaluations must be >= 0 (0 = figures at the end only), got {plots_every_n_evaluations}"
            )
        self.every_n_epochs = every_n_epochs
        self.plots_every_n_evaluations = plots_every_n_evaluations
        self._fit_evaluations = 0
        self._figures_drawn = False  # whether the figures on disk belong to ``last_result``
        self.epoch_max_samples = epoch_max_samples
        self.report_dir = report_dir
        self.plots = plots
        self.tune = tune
        self.last_result: EvaluationResult | None = None
        self._resolved_report_dir: Path | None = None
        self._checkpoint_digest: tuple[str, str] | None = None

    def _datamodule(self, trainer: pl.Trainer) -> OODDataModule:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, OODDataModule):
            raise TypeError("OODEvaluation needs an OODDataModule as the trainer's datamodule")
        return datamodule

    def _report_dir(self, trainer: pl.Trainer) -> Path:
        """The folder resolved in :meth:`setup`. ``trainer.log_dir`` broadcasts from rank 0, so it is read
        there, on every rank at the same point; reading it later on rank 0 alone would deadlock DDP."""
        if self._resolved_report_dir is None:
            self._resolved_report_dir = resolve_output_dir(trainer, self.report_dir, "ood_report")
        return self._resolved_report_dir

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail fast, before training: scores buildable for this method, OOD sets present, dir writable."""
        if not isinstance(pl_module, OODMethod):
            raise TypeError(f"OODEvaluation needs an OODMethod, got {type(pl_module).__name__}")
        self._resolved_report_dir = None
        self._fit_evaluations = 0
        self._figures_drawn = False
        report_dir = self._report_dir(trainer)  # every rank: may broadcast
        datamodule = self._datamodule(trainer)
        datamodule.setup(stage)
        check_evaluable(pl_module, datamodule)
        if trainer.is_global_zero:
            check_writable(report_dir)

    def _run(
        self,
        trainer: pl.Trainer,
        pl_module: OODMethod,
        max_samples: int | None = None,
        log: bool = True,
        figures: bool = False,
    ) -> None:
        result = evaluate_model(
            pl_module,
            self._datamodule(trainer),
            device=pl_module.device,
            tune=self.tune,
            meta=self._meta(trainer, pl_module),
            max_samples=max_samples,
        )
        self.last_result = result
        if log:
            # identical on every rank (outputs are gathered), so no cross-rank reduction is needed
            pl_module.log_dict(flatten_report(result.report), sync_dist=False, rank_zero_only=False)
        self._figures_drawn = False
        if trainer.is_global_zero:
            if figures:
                self._write_figures(trainer)
            else:
                write_report(result.report, self._report_dir(trainer))

    def _meta(self, trainer: pl.Trainer, pl_module: OODMethod) -> dict:
        """Which weights the report describes: the training position during ``fit``; the checkpoint's
        path, sha256, epoch and step when ``test`` / ``evaluate`` loaded one (the trainer's own counters
        are 0 there, since evaluation does not restore the training loop)."""
        if trainer.state.fn == "fit" or not trainer.ckpt_path:
            return {"epoch": trainer.current_epoch, "global_step": trainer.global_step}
        path = str(Path(trainer.ckpt_path).resolve())
        if self._checkpoint_digest is None or self._checkpoint_digest[0] != path:
            self._checkpoint_digest = (path, file_sha256(path))
        loaded = pl_module.loaded_checkpoint or {}
        return {
            "epoch": loaded.get("epoch"),
            "global_step": loaded.get("global_step"),
            "checkpoint": path,
            "checkpoint_sha256": self._checkpoint_digest[1],
        }

    def _write_figures(self, trainer: pl.Trainer) -> None:
        """Rank 0: the figures of ``last_result`` (when ``plots``), then its report files linking them."""
        assert self.last_result is not None
        directory = self._report_dir(trainer)
        figures: list[str] = []
        if self.plots:
            writers = [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
            figures = write_result_figures(self.last_result, directory, writers, trainer.global_step)
        write_report(self.last_result.report, directory, figures=figures)
        self._figures_drawn = True

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_epochs == 0:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0 or trainer.current_epoch + 1 == trainer.max_epochs:
            self._fit_evaluations += 1
            every = self.plots_every_n_evaluations
            figures = self.plots and every > 0 and self._fit_evaluations % every == 0
            self._run(trainer, pl_module, max_samples=self.epoch_max_samples, figures=figures)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module, figures=True)
        self._print(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Per-epoch numbers came from subsets: the printed and written report covers the full sets.
        # on_train_end still runs on the training device with every rank alive (on_fit_end comes after
        # the strategy's teardown); Lightning allows no self.log here, the report files carry it.
        if self.epoch_max_samples is not None and self.every_n_epochs > 0:
            self._run(trainer, pl_module, max_samples=None, log=False, figures=True)
        elif self.last_result is not None and not self._figures_drawn and trainer.is_global_zero:
            # the last per-epoch evaluation already covered the full sets: draw its figures once, now
            self._write_figures(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(trainer)

    def _print(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero and self.last_result is not None:
            rank_zero_info(f"\n{format_table(self.last_result.report)}\nreport: {self._report_dir(trainer)}")
