"""``python -m robustft fit|validate|test|predict|evaluate|average --config cfg.yaml``.

One LightningCLI subclass. Models and datamodules are given as ``class_path`` / ``init_args`` (any
:class:`~robustft.methods.base.OODMethod` / :class:`~robustft.data.OODDataModule` subclass; short class
names work because the packages are imported here). ``evaluate`` is a method of :class:`RobustTrainer`
registered as a subcommand, so it parses exactly like ``fit``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI

import robustft.callbacks  # noqa: F401 - lets YAML name callbacks by class name
import robustft.methods  # noqa: F401 - lets YAML name methods by class name
from robustft.callbacks.ood_eval import OODEvaluation
from robustft.checkpointing import AtomicCheckpointIO
from robustft.data.datamodule import OODDataModule
from robustft.data.sources import DatasetSpec
from robustft.methods.base import CHECKPOINT_KEY, OODMethod
from robustft.ood.report import check_writable


class RobustTrainer(pl.Trainer):
    """``lightning.pytorch.Trainer`` with atomic checkpoints and an ``evaluate`` entry point."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        plugins = kwargs.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, pl.plugins.CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        super().__init__(*args, **kwargs)

    def evaluate(
        self,
        model: OODMethod,
        datamodule: OODDataModule,
        ckpt_path: str | None = None,
        report_dir: str = "reports",
        tune: bool = False,
    ) -> dict:
        """Evaluate a checkpoint of any method (or the configured model's own weights) on the ID test set
        and every OOD set; write ``report.json``, ``report.csv`` and ``report.md`` into ``report_dir``.

        Args:
            model: the method (its hyper-parameters come from ``ckpt_path`` when one is given).
            datamodule: ID and OOD data.
            ckpt_path: a checkpoint written by ``fit``; omit to evaluate the model as configured
                (e.g. a classifier whose ``backbone_weights`` is a plain weights file).
            report_dir: output folder of the report files.
            tune: tune score hyper-parameters on ``data.ood_val`` (never on test sets) first.
        """
        check_writable(report_dir)
        if ckpt_path is not None and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path: '{ckpt_path}' is not a file; give a checkpoint written by fit")
        callback = next((c for c in self.callbacks if isinstance(c, OODEvaluation)), None)
        if callback is None:
            callback = OODEvaluation(every_n_epochs=0)
            self.callbacks.append(callback)
        callback.report_dir = report_dir
        callback.tune = tune
        self.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        return callback.last_result.report

    def average(
        self,
        model: OODMethod,
        datamodule: OODDataModule,
        finetuned_ckpt: str,
        zero_shot_ckpt: str | None = None,
        alphas: list[float] | None = None,
        report_dir: str = "reports/average",
        save_alpha: float | str | None = None,
        corruptions: list[str] | None = None,
        severities: list[int] | None = None,
        shifted_sets: dict[str, DatasetSpec] | None = None,
        head_temperature: float | str | None = None,
        bn_recalibration_batches: int = 0,
        tune: bool = False,
        shifted_projection: str = "subset",
    ) -> dict:
        """WiSE-FT / BANG: evaluate the weight-space ensembles (1-α)·θ0 + α·θ1 over a grid of α.

        Writes ``average.json``/``.csv``/``.md`` (ID, ID-validation, shifted-set accuracy and OOD AUROC of the
        default score per α) and ``average.png`` (accuracy vs α) into ``report_dir``.

        Args:
            model: the method of both checkpoints (as in the fit config).
            datamodule: ID and OOD data; ID test, ID validation, shifted and OOD sets are evaluated per α.
            finetuned_ckpt: θ1, a checkpoint of ``model``'s method written by ``fit``.
            zero_shot_ckpt: θ0, a checkpoint of the same method; omit to use the configured model's initial
                weights (pre-trained backbone + pre-trained or zero-shot head).
            alphas: weights of θ1 (default 0, 0.1, ..., 1).
            report_dir: output folder.
            save_alpha: save one averaged model as ``averaged_alpha<α>.ckpt`` (loadable by ``evaluate``): a
                number, ``best_val`` (ID validation accuracy) or ``best_shifted`` (oracle on shifted sets).
            corruptions: on-the-fly corruptions of the ID test set (default gaussian_noise, gaussian_blur,
                contrast; ``[]`` for none).
            severities: CIFAR-10-C severities 1-5 (default [3]).
            shifted_sets: extra ID-labelled shifted sets ``{name: dataset spec}``: the ID classes, or a subset
                of them matched by class name (e.g. ImageNet-R's 200 of ImageNet's 1000).
            shifted_projection: how a subset set is scored: ``subset`` (argmax over its classes only, the
                WiSE-FT ImageNet-R/-A convention and the default) or ``full`` (argmax over all ID classes).
            head_temperature: BANG scaling: divide θ1's head by a number, or by T fitted on ID validation
                (``nll``: temperature scaling; ``balance``: logit-norm ratio of θ1 to θ0).
            bn_recalibration_batches: re-estimate BatchNorm statistics of each average on this many
                training batches (0 = keep the averaged statistics).
            tune: tune score hyper-parameters on ``data.ood_val`` for every α.
        """
        from robustft.data.shifts import DEFAULT_CORRUPTIONS
        from robustft.evaluation.weight_space import DEFAULT_ALPHAS, average_checkpoints

        if self.world_size > 1:
            raise RuntimeError("average runs on one process; set trainer.devices: 1 and trainer.num_nodes: 1")
        result = average_checkpoints(
            model,
            datamodule,
            finetuned_ckpt,
            zero_shot_ckpt,
            alphas=DEFAULT_ALPHAS if alphas is None else alphas,
            report_dir=report_dir,
            save_alpha=save_alpha,
            corruptions=DEFAULT_CORRUPTIONS if corruptions is None else corruptions,
            severities=[3] if severities is None else severities,
            shifted_sets=shifted_sets,
            head_temperature=head_temperature,
            bn_recalibration_batches=bn_recalibration_batches,
            tune=tune,
            device=self.strategy.root_device,
            shifted_projection=shifted_projection,
        )
        return {"rows": result.rows, "meta": result.meta}


EVAL_SUBCOMMANDS = ("validate", "test", "predict", "evaluate")
#: model arguments a user may change when evaluating a checkpoint (the rest come from the checkpoint)
EVAL_TIME_MODEL_ARGS = ("scores", "score_kwargs")


def _ckpt_path_arg(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--ckpt_path" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--ckpt_path="):
            return arg.split("=", 1)[1]
    return None


def _model_from_checkpoint(args: list[str]) -> list[str]:
    """Let ``evaluate --ckpt_path X`` run without a model section: default ``--model`` to the checkpoint's
    method class. Inserted right after the subcommand, so a model in the user's config still wins."""
    if not args or args[0] not in EVAL_SUBCOMMANDS:
        return args
    ckpt_path = _ckpt_path_arg(args)
    if ckpt_path is None or not Path(ckpt_path).is_file():
        return args
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable checkpoints are reported by Lightning with their own message
        return args
    method = (checkpoint.get(CHECKPOINT_KEY) or {}).get("method")
    return [args[0], f"--model={method}", *args[1:]] if method else args


class RobustFTCLI(LightningCLI):
    """LightningCLI with the ``evaluate`` subcommand; evaluating a checkpoint needs no model section."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            **LightningCLI.subcommands(),
            "evaluate": {"model", "datamodule"},
            "average": {"model", "datamodule"},
        }

    def parse_arguments(self, parser: Any, args: Any) -> None:
        if args is None or isinstance(args, list):
            args = _model_from_checkpoint(list(sys.argv[1:] if args is None else args))
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Checkpoint hyper-parameters override the config (Lightning's rule), except the evaluation-time
        ones (which scores to compute), which the user's config or flags keep."""
        subcommand = self.config.get("subcommand")
        init_args = self.config[subcommand].model.get("init_args", {}) if subcommand else {}
        kept = {key: init_args.get(key) for key in EVAL_TIME_MODEL_ARGS if init_args.get(key) is not None}
        super()._parse_ckpt_path()
        for key, value in kept.items():
            self.config[subcommand].model.init_args[key] = value


def main(args: list[str] | None = None, run: bool = True) -> RobustFTCLI:
    """Entry point of ``python -m robustft``; ``args`` lets tests drive the real CLI in-process."""
    return RobustFTCLI(
        OODMethod,
        OODDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=RobustTrainer,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )
