"""``python -m robustft fit|validate|test|predict|evaluate|average --config cfg.yaml``.

One LightningCLI subclass. Models and datamodules are given as ``class_path`` / ``init_args`` (any
:class:`~robustft.methods.base.OODMethod` / :class:`~robustft.data.OODDataModule` subclass; short class
names work because the packages are imported here). ``evaluate`` is a method of :class:`RobustTrainer`
registered as a subcommand, so it parses exactly like ``fit``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

import robustft.callbacks  # noqa: F401 - lets YAML name callbacks by class name
import robustft.methods  # noqa: F401 - lets YAML name methods by class name
from robustft.averaging import StateDictMismatchError
from robustft.backbones import WeightsError
from robustft.callbacks.ood_eval import OODEvaluation
from robustft.checkpointing import AtomicCheckpointIO, CheckpointFileError, inspect_checkpoint
from robustft.data.datamodule import OODDataModule
from robustft.data.sources import DataConfigError, DatasetSpec
from robustft.evaluation.engine import CaptureTestOutputs, EvaluationConfigError, NonFiniteOutputsError
from robustft.io import AtomicWriteError
from robustft.methods.base import ConfigMismatchError, NonFiniteLossError, OODMethod, method_mismatch_message
from robustft.ood.report import ReportDirError, check_writable
from robustft.registry import UnknownNameError
from robustft.state_dicts import NotAStateDictError


class RunFolderExistsError(RuntimeError):
    """A fresh ``fit`` would write into the checkpoint folder of an earlier run."""


class ConfigFileError(ValueError):
    """A ``--config`` file is missing or is not valid YAML."""


class RobustTrainer(pl.Trainer):
    """``lightning.pytorch.Trainer`` with atomic checkpoints and an ``evaluate`` entry point.

    ``test`` / ``evaluate`` forward each ID test sample once: :class:`~robustft.evaluation.engine.CaptureTestOutputs`
    hands the test loop's outputs to the OOD evaluation at the end of the test epoch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        plugins = kwargs.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, pl.plugins.CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        callbacks = kwargs.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
        if not any(isinstance(c, CaptureTestOutputs) for c in callbacks):
            callbacks.append(CaptureTestOutputs())
        kwargs["callbacks"] = callbacks
        super().__init__(*args, **kwargs)

    def fit(self, model: pl.LightningModule, *args: Any, ckpt_path: str | None = None, **kwargs: Any) -> None:
        """``Trainer.fit``, refusing to start a fresh run in the checkpoint folder of an earlier one.

        Lightning would write ``last-v1.ckpt`` next to the earlier run's ``last.ckpt`` (which the README
        tells users to evaluate) and mix both runs' files. Resuming (``--ckpt_path last``) and SLURM's
        requeue (an ``hpc_ckpt_*.ckpt`` in ``default_root_dir``) continue the same run and are allowed.
        """
        if ckpt_path is None and self._checkpoint_connector._hpc_resume_path is None:
            for folder in self._fixed_checkpoint_dirs():
                if (folder / "last.ckpt").exists():
                    raise RunFolderExistsError(
                        f"'{folder}' already holds last.ckpt of an earlier run. Resume it with --ckpt_path last, "
                        "or start a new run in another folder (e.g. --trainer.logger.init_args.version run2, or "
                        "another trainer.default_root_dir), or delete the earlier run's folder"
                    )
        return super().fit(model, *args, ckpt_path=ckpt_path, **kwargs)

    def _fixed_checkpoint_dirs(self) -> list[Path]:
        """Folders the ModelCheckpoint callbacks will write to, resolved as Lightning resolves them, but
        only where the folder is fixed in advance: a logger with an automatic version (``version_N``)
        starts a new folder on every run and cannot clash. Reads no collective (runs before setup)."""
        folders = []
        for callback in self.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint):
                continue
            if callback.dirpath is not None:
                folders.append(Path(callback.dirpath))
            elif not self.loggers:
                folders.append(Path(self.default_root_dir) / "checkpoints")
            else:
                logger = self.loggers[0]
                if getattr(logger, "_version", 0) is None:  # automatic version: a fresh folder
                    continue
                version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
                folders.append(Path(logger.save_dir or self.default_root_dir) / str(logger.name) / version / "checkpoints")
        return folders

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
        if ckpt_path is not None:
            inspect_checkpoint(ckpt_path)
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
#: what a user's mistake can raise; these end in one short message instead of a traceback
USER_ERRORS: tuple[type[BaseException], ...] = (
    ArgumentError,
    AtomicWriteError,
    CheckpointFileError,
    ConfigFileError,
    ConfigMismatchError,
    DataConfigError,
    EvaluationConfigError,
    MisconfigurationException,
    NonFiniteLossError,
    NonFiniteOutputsError,
    NotAStateDictError,
    ReportDirError,
    RunFolderExistsError,
    StateDictMismatchError,
    UnknownNameError,
    WeightsError,
)
#: ``--ckpt_path`` values Lightning resolves itself (its checkpoint connector), never file names
LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
DEBUG_FLAG = "--debug"
DEBUG_ENV = "ROBUSTFT_DEBUG"


def _flag_value(args: Sequence[str], *flags: str) -> list[str]:
    """Every value given to ``flags`` (``--flag value`` or ``--flag=value``)."""
    values = []
    for i, arg in enumerate(args):
        for flag in flags:
            if arg == flag and i + 1 < len(args):
                values.append(args[i + 1])
            elif arg.startswith(f"{flag}="):
                values.append(arg.split("=", 1)[1])
    return values


def _ckpt_path_arg(args: Sequence[str]) -> str | None:
    values = _flag_value(args, "--ckpt_path")
    return values[-1] if values else None


def check_config_files(args: Sequence[str]) -> None:
    """Every ``--config`` file exists and parses as YAML; errors name the file, line and column.

    jsonargparse reports a YAML syntax error against "<unicode string>", which names no file."""
    for value in _flag_value(args, "--config", "-c"):
        path = Path(value)
        if not path.is_file():
            raise ConfigFileError(f"--config '{value}': no such file")
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigFileError(f"--config '{value}': YAML syntax error{where}: {problem}; fix the file") from None


def _bare_class_names(args: Sequence[str]) -> set[str]:
    """Class names given without their module (``ZeroShotCLIP``) on the command line or in ``--config`` files."""
    found: list[Any] = _flag_value(args, "--model", "--model.class_path", "--model.help", "--data", "--data.class_path")

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            found.append(node.get("class_path"))
            found.extend(node.get(key) for key in ("model", "data"))  # the `model: ClassName` shorthand
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    for value in _flag_value(args, "--config", "-c"):
        path = Path(value)
        if path.is_file():
            collect(yaml.safe_load(path.read_text()))
    return {name for name in found if isinstance(name, str) and name.isidentifier()}


def import_named_methods(args: Sequence[str]) -> None:
    """Import the modules of the methods a command names by bare class name, before parsing.

    jsonargparse resolves a bare name only among subclasses already imported. ``robustft.methods`` may
    export a method lazily (a PEP 562 ``__getattr__``: e.g. the CLIP methods, so that a ResNet run or
    ``--help`` never imports open_clip); reading the attribute imports its module. A no-op for a name
    that is already imported or is not a method."""
    import robustft.methods as methods

    for name in _bare_class_names(args):
        try:
            getattr(methods, name)
        except AttributeError:
            pass


def _model_from_checkpoint(args: list[str]) -> list[str]:
    """Let ``evaluate --ckpt_path X`` run without a model section: default ``--model`` to the checkpoint's
    method class. Inserted right after the subcommand, so a model in the user's config still wins (and
    is then checked against the checkpoint in :meth:`RobustFTCLI._parse_ckpt_path`). A file that is not a
    robustft checkpoint is refused here, before parsing, with what it is and the fix."""
    if not args or args[0] not in (*EVAL_SUBCOMMANDS, "fit"):
        return args
    ckpt_path = _ckpt_path_arg(args)
    if ckpt_path is None or ckpt_path in LIGHTNING_CKPT_KEYWORDS:  # resolved by Lightning, not a file
        return args
    info = inspect_checkpoint(ckpt_path)
    return [args[0], f"--model={info.method}", *args[1:]] if args[0] in EVAL_SUBCOMMANDS else args


def _condense_argument_error(message: str) -> str:
    """jsonargparse's message without the lines that describe its own type machinery."""
    noise = ("Does not validate against any of the Union subtypes", "Subtypes: [", "- Expected a <class 'NoneType'>",
             "Given value type:", "Given value:", "Errors:")
    lines = [line.strip() for line in message.strip().splitlines() if not line.strip().startswith(noise)]
    return "\n".join(f"  {line}" for line in lines if line)


def format_user_error(error: BaseException) -> str | None:
    """The short block a user sees for a mistake: what is wrong, where, and the fix; ``None`` for a bug.

    jsonargparse wraps errors raised while it builds the model or data (a misspelt score name raises
    ``ConfigMismatchError`` inside ``ValueError`` inside ``ArgumentError``): the outermost robustft error
    in the chain carries the message that names the field, so the chain is searched for it first."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    ours = [e for e in chain if isinstance(e, USER_ERRORS) and not isinstance(e, ArgumentError)]
    if ours:
        return f"robustft: error: {ours[0]}"
    parse_errors = [e for e in chain if isinstance(e, ArgumentError)]
    if parse_errors:
        return (f"robustft: error in the configuration:\n{_condense_argument_error(str(parse_errors[0]))}\n"
                "See the accepted options with `python -m robustft <subcommand> --help`, or those of one class "
                "with `--model.help <class>` / `--data.help <class>`.")
    return None


class RobustFTCLI(LightningCLI):
    """LightningCLI with the ``evaluate`` / ``average`` subcommands; evaluating a checkpoint needs no model
    section, and evaluation subcommands write into their own folder, never over the training run's."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            **LightningCLI.subcommands(),
            "evaluate": {"model", "datamodule"},
            "average": {"model", "datamodule"},
        }

    def add_arguments_to_parser(self, parser: Any) -> None:
        # The datamodule never reaches into the model: the model's preprocessing (image size, mean, std)
        # is passed to it when both are instantiated.
        parser.link_arguments("model.preprocess", "data.init_args.preprocess", apply_on="instantiate")

    def init_parser(self, **kwargs: Any) -> Any:
        # raise ArgumentError instead of printing a 50-line usage dump; `cli_main` prints one short block
        kwargs["exit_on_error"] = False
        kwargs["allow_abbrev"] = False  # a misspelt flag is an error, not a silently expanded prefix
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        # LightningCLI warns when both `args` and sys.argv are given; robustft itself passes the (edited)
        # command line, so it parses here directly.
        if args is None or isinstance(args, list):
            args = list(sys.argv[1:] if args is None else args)
            check_config_files(args)
            args = _model_from_checkpoint(args)
            import_named_methods(args)
        self.config = parser.parse_object(args) if isinstance(args, dict) else parser.parse_args(args)

    def _parse_ckpt_path(self) -> None:
        """Checkpoint hyper-parameters override the config (Lightning's rule), except the evaluation-time
        ones (which scores to compute), which the user's config or flags keep. A model class named in the
        config that is not the checkpoint's method is refused (Lightning would silently swap it)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        model = self.config[subcommand].get("model")
        if ckpt_path and Path(ckpt_path).is_file() and model is not None and model.get("class_path"):
            info = inspect_checkpoint(ckpt_path)
            configured = _full_class_path(model.class_path)
            if configured != info.method:
                raise ConfigMismatchError(method_mismatch_message(info.method, configured))
        init_args = model.get("init_args", {}) if model is not None else {}
        kept = {key: init_args.get(key) for key in EVAL_TIME_MODEL_ARGS if init_args.get(key) is not None}
        super()._parse_ckpt_path()
        for key, value in kept.items():
            self.config[subcommand].model.init_args[key] = value

    def before_instantiate_classes(self) -> None:
        """``validate`` / ``test`` / ``predict`` / ``evaluate`` log into a ``<subcommand>`` folder of their own,
        so they never overwrite the training run's ``config.yaml``, events or ``ood_report``."""
        subcommand = self.config.get("subcommand")
        if subcommand in EVAL_SUBCOMMANDS:
            redirect_outputs(self.config[subcommand].trainer, subcommand)


def _full_class_path(class_path: str) -> str:
    """``Classifier`` -> ``robustft.methods.classifier.Classifier`` (how checkpoints name methods)."""
    from jsonargparse._typehints import resolve_class_path_by_name  # the name resolution the parser used

    from robustft.methods.base import method_path

    try:
        resolved = resolve_class_path_by_name(OODMethod, class_path)
        module, _, name = resolved.rpartition(".")
        return method_path(getattr(__import__(module, fromlist=[name]), name))
    except Exception:  # unresolvable: compare as written
        return class_path


def redirect_outputs(trainer_config: Any, subcommand: str) -> None:
    """Point an evaluation subcommand's logger (or ``default_root_dir`` without one) at ``<folder>/<subcommand>``."""
    logger = trainer_config.get("logger")
    if logger is False:
        root = trainer_config.get("default_root_dir") or os.getcwd()
        trainer_config.default_root_dir = str(Path(root) / subcommand)
        return
    loggers = logger if isinstance(logger, list) else [logger]
    for entry in loggers:
        class_path = str(entry.get("class_path", "")) if hasattr(entry, "get") else ""
        init_args = entry.get("init_args") if hasattr(entry, "get") else None
        if init_args is None:
            continue
        if class_path.endswith("TensorBoardLogger") and not init_args.get("sub_dir"):
            init_args.sub_dir = subcommand
        elif class_path.endswith("CSVLogger"):
            init_args.name = f"{init_args.get('name') or 'lightning_logs'}/{subcommand}"


#: Lightning's console advertising for its cloud products, logged at info level on every run
ADVERT_PREFIX = "\N{ELECTRIC LIGHT BULB} Tip:"
#: warnings printed on every run that the user cannot act on: (message regex, category, module regex)
UNACTIONABLE_WARNINGS = (
    # Lightning 2.6's batch-size/pytree helper builds torch's deprecated LeafSpec on every fit/test step;
    # it is Lightning's call into torch, not one of ours, and goes away with a Lightning update
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERT_PREFIX)


def quiet_console() -> None:
    """A console that shows what matters: no advertising tips, no warnings nobody can act on.

    Only the exact messages above are dropped; every other warning (including Lightning's real ones,
    e.g. ``log_every_n_steps`` larger than the epoch) still prints. Idempotent."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())
    for message, category, module in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def main(args: list[str] | None = None, run: bool = True) -> RobustFTCLI:
    """Build and run the CLI; ``args`` lets tests drive the real CLI in-process. Errors propagate (use
    :func:`cli_main` for the command-line behaviour)."""
    quiet_console()
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


def cli_main(args: list[str] | None = None) -> int:
    """``python -m robustft``: run the CLI; a user's mistake ends in one short block on stderr and exit
    code 2, without a traceback. ``--debug`` (or ``ROBUSTFT_DEBUG=1``) shows the full traceback."""
    args = list(sys.argv[1:] if args is None else args)
    debug = DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [arg for arg in args if arg != DEBUG_FLAG]
    try:
        main(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:
        message = format_user_error(exc)
        if message is None or debug:
            raise
        print(message, file=sys.stderr)
        return 2
    return 0
