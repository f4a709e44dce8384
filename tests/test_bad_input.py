"""A new user's mistakes, driven through the real command line (``robustft.cli.cli_main``).

Every case must end the way ``python -m robustft`` ends for a user: exit code 2, one short message on
stderr that names the field or file at fault (and the fix), no traceback, and nothing in the earlier
run's folder changed or lost. The data are small NHWC arrays cut from the bundled real CIFAR-10 and DTD
sets, so that each case costs a parse and a model build, not a JPEG decode of 5k images.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from robustft.cli import cli_main

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = str(REPO / "data" / "weights" / "resnet20-12fca82f.th")
TABLE_ENV = "ROBUSTFT_BAD_INPUT_TABLE"


@dataclass(frozen=True)
class BadInputWorld:
    """Real-data arrays, a base config, and one finished run whose folder must never be harmed."""

    root: Path
    config: Path
    run_dir: Path  # the finished run's log folder (config.yaml, checkpoints/, ood_report/)
    ckpt: Path  # its last.ckpt

    def npz(self, name: str, **arrays: np.ndarray) -> str:
        path = self.root / "arrays" / f"{name}.npz"
        np.savez(path, **arrays)
        return str(path)


def _real_arrays(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    cifar = np.load(REPO / "data" / "cifar10" / "cifar10_test_2k.npz")
    dtd = np.load(REPO / "data" / "dtd" / "dtd_10class_32.npz")
    names = [str(c) for c in cifar["class_names"]]
    paths = {
        "train": (cifar["images"][:320], cifar["labels"][:320]),
        "test": (cifar["images"][1000:1100], cifar["labels"][1000:1100]),
        "dtd": (dtd["images"][:60], dtd["labels"][:60]),
        "dtd_b": (dtd["images"][60:120], dtd["labels"][60:120]),
    }
    out = {}
    for key, (images, labels) in paths.items():
        out[key] = str(folder / f"{key}.npz")
        np.savez(out[key], images=images, labels=labels, class_names=names if key in ("train", "test") else [])
    return out


def _base_config(root: Path, arrays: dict[str, str]) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(root / "runs"), "name": "run", "version": ""},
            },
            "callbacks": [
                {"class_path": "robustft.callbacks.OODEvaluation", "init_args": {"every_n_epochs": 1, "plots": False}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
            ],
        },
        "model": {
            "class_path": "robustft.methods.Classifier",
            "init_args": {"num_classes": 10, "backbone": "cifar_resnet20", "backbone_weights": WEIGHTS,
                          "scores": ["msp", "energy"],
                          "optimizer": {"class_path": "torch.optim.SGD",
                                        "init_args": {"lr": 0.01, "momentum": 0.9, "weight_decay": 5.0e-4}}},
        },
        "data": {
            "class_path": "robustft.data.OODDataModule",
            "init_args": {
                "train": {"source": "npz", "path": arrays["train"]},
                "test": {"source": "npz", "path": arrays["test"]},
                "ood": {"far": {"dtd": {"source": "npz", "path": arrays["dtd"]}}},
                "batch_size": 32,
                "eval_batch_size": 100,
            },
        },
    }


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> BadInputWorld:
    root = tmp_path_factory.mktemp("bad_input")
    arrays = _real_arrays(root / "arrays")
    config = root / "base.yaml"
    config.write_text(yaml.safe_dump(_base_config(root, arrays), sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        assert cli_main(["fit", "--config", str(config)]) == 0
    run_dir = root / "runs" / "run"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return BadInputWorld(root=root, config=config, run_dir=run_dir, ckpt=ckpt)


def _fails_cleanly(world: BadInputWorld, capsys: pytest.CaptureFixture[str], args: list[str],
                   *must_name: str) -> str:
    """Run the CLI; assert exit 2, a one-block message naming everything in ``must_name``, no
    traceback, and the finished run's folder unchanged. Returns the message."""
    before = _snapshot(world.run_dir)
    capsys.readouterr()
    code = cli_main(args)
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, f"exit code {code}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err + captured.out
    message = err[err.index("robustft: error"):] if "robustft: error" in err else ""
    assert message, f"no robustft error block in stderr:\n{err[-3000:]}"
    assert len(message.splitlines()) <= 8, f"message is not short:\n{message}"
    for needle in must_name:
        assert needle in message, f"{needle!r} not in message:\n{message}"
    if os.environ.get(TABLE_ENV):  # tools/bad_input_table.py collects case -> message for experiments/
        case = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
        with open(os.environ[TABLE_ENV], "a") as handle:
            handle.write(json.dumps({"case": case, "args": args[3:] if args[0] == "fit" else args,
                                     "message": message.strip()}) + "\n")
    after = _snapshot(world.run_dir)
    assert {name: after.get(name) for name in before} == before, "a file of the earlier run changed or vanished"
    tops = {name.split("/")[0] for name in before} | set(EVAL_FOLDERS)
    assert all(name.split("/")[0] in tops for name in after), (
        "new files at the top of the earlier run's folder"
    )
    return message


EVAL_FOLDERS = ("validate", "test", "predict", "evaluate")  # where evaluation subcommands may log
_CASES = iter(range(10**6))


def _fit(world: BadInputWorld, *extra: str) -> list[str]:
    """A fresh run of the base config (its own log folder, as a user's new experiment would have)."""
    return ["fit", "--config", str(world.config), "--trainer.logger.init_args.name", f"case{next(_CASES)}", *extra]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


# ------------------------------------------------------------------------------------------ the config
def test_unknown_model_argument(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--model.init_args.lrate", "0.1"), "lrate", "model")


def test_unknown_trainer_argument(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--trainer.max_epoch", "3"), "max_epoch")


def test_unknown_dataset_key(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.train", "{source: npz, pth: x.npz}"), "pth")


def test_unknown_method_class(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--model.class_path", "robustft.methods.NoSuchMethod"), "NoSuchMethod")


def test_yaml_syntax_error_names_the_file_and_line(world, capsys) -> None:
    broken = world.root / "broken.yaml"
    broken.write_text("trainer:\n  max_epochs: 1\n bad: [\n")
    _fails_cleanly(world, capsys, ["fit", "--config", str(broken)], str(broken), "line 3")


def test_missing_config_file(world, capsys) -> None:
    _fails_cleanly(world, capsys, ["fit", "--config", "nowhere/cfg.yaml"], "nowhere/cfg.yaml")


def test_misspelt_score(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--model.init_args.scores", "[msp, enrgy]"), "model.scores", "energy")


def test_score_kwargs_for_unconfigured_score(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--model.init_args.score_kwargs", "{knn: {k: 5}}"), "model.score_kwargs")


def test_class_count_mismatch(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--model.init_args.num_classes", "5"), "model.num_classes", "10")


def test_zero_classes(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--model.init_args.num_classes", "0"), "model.num_classes")


def test_missing_backbone_weights(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--model.init_args.backbone_weights", "nowhere/w.th"), "nowhere/w.th",
                   "model.init_args.backbone_weights")


def test_unknown_backbone(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--model.init_args.backbone", "cifar_resnet21"), "cifar_resnet21")


# ------------------------------------------------------------------------------------------ the data
def test_missing_train_path(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.train", "{source: npz, path: nowhere/x.npz}"),
                   "data.train.path", "nowhere/x.npz")


def test_missing_ood_path(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.ood.far.dtd", "{source: npz, path: no/dtd.npz}"),
                   "data.ood.far.dtd", "no/dtd.npz")


def test_unknown_source(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.train", "{source: nzp, path: x.npz}"),
                   "data.train.source", "npz")


def test_empty_ood_set(world, capsys) -> None:
    spec = f"{{source: npz, path: {REPO}/data/dtd/dtd_10class_32.npz, exclude_classes: [0,1,2,3,4,5,6,7,8,9]}}"
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.ood.far.dtd", spec), "data.ood.far.dtd", "empty")


def test_no_ood_sets(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.ood", "{}"), "data.ood")


def test_same_ood_name_in_two_groups(world, capsys) -> None:
    other = str(world.root / "arrays" / "dtd_b.npz")
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.ood.near.dtd", f"{{source: npz, path: {other}}}"),
                   "data.ood.near.dtd", "data.ood.far.dtd")


def test_channels_first_images(world, capsys) -> None:
    images = np.load(world.root / "arrays" / "dtd.npz")["images"].transpose(0, 3, 1, 2).copy()
    path = world.npz("nchw", images=images, labels=np.zeros(len(images), dtype=np.int64))
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.ood.far.dtd", f"{{source: npz, path: {path}}}"),
                   "data.ood.far.dtd", path, "transpose")


def test_float_images(world, capsys) -> None:
    path = world.npz("float", images=np.random.rand(8, 32, 32, 3).astype(np.float32), labels=np.zeros(8, dtype=np.int64))
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.ood.far.dtd", f"{{source: npz, path: {path}}}"),
                   "data.ood.far.dtd", path, "uint8")


def test_label_count_mismatch(world, capsys) -> None:
    path = world.npz("count", images=np.zeros((8, 32, 32, 3), dtype=np.uint8), labels=np.zeros(5, dtype=np.int64))
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.test", f"{{source: npz, path: {path}}}"),
                   "data.test", path)


def _train_with_labels(world: BadInputWorld, name: str, labels: np.ndarray) -> str:
    arrays = np.load(world.root / "arrays" / "train.npz")
    return world.npz(name, images=arrays["images"], labels=labels, class_names=arrays["class_names"])


@pytest.mark.parametrize("bad_label", [15, -1])
def test_train_label_out_of_range(world, capsys, bad_label: int) -> None:
    labels = np.load(world.root / "arrays" / "train.npz")["labels"].copy()
    labels[7] = bad_label
    path = _train_with_labels(world, f"train_label_{bad_label}", labels)
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.train", f"{{source: npz, path: {path}}}"),
                   "data.train", path, str(bad_label))


def test_float_labels(world, capsys) -> None:
    labels = np.load(world.root / "arrays" / "train.npz")["labels"].astype(np.float64)
    labels[3] = 1.5
    path = _train_with_labels(world, "train_float_labels", labels)
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.train", f"{{source: npz, path: {path}}}"),
                   "data.train", path, "1.5")


def test_test_label_outside_train_classes(world, capsys) -> None:
    arrays = np.load(world.root / "arrays" / "test.npz")
    labels = arrays["labels"].copy()
    labels[0] = 12
    path = world.npz("test_label_12", images=arrays["images"], labels=labels)
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.test", f"{{source: npz, path: {path}}}"),
                   "data.test", "12")


@pytest.mark.parametrize("value", ["0", "-5"])
def test_eval_batch_size_below_one(world, capsys, value: str) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.eval_batch_size", value), "data.eval_batch_size")


def test_batch_size_zero(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.batch_size", "0"), "data.batch_size")


def test_negative_max_samples(world, capsys) -> None:
    spec = f"{{source: npz, path: {world.root}/arrays/test.npz, max_samples: -3}}"
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.test", spec), "data.test.max_samples")


def test_val_fraction_out_of_range(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.val_fraction", "1.5"), "data.val_fraction")


def test_unknown_augmentation(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--data.init_args.augmentation", "crop_flop"), "data.augmentation")


# ------------------------------------------------------------------------------------------ checkpoints
def _test_ckpt(world: BadInputWorld, ckpt: str | Path, *extra: str) -> list[str]:
    return ["test", "--config", str(world.config), "--ckpt_path", str(ckpt), *extra]


def test_plain_state_dict_as_checkpoint(world, capsys) -> None:
    message = _fails_cleanly(world, capsys, _test_ckpt(world, WEIGHTS), WEIGHTS, "backbone_weights")
    assert "plain weights" in message


def test_truncated_checkpoint(world, capsys) -> None:
    truncated = world.root / "truncated.ckpt"
    truncated.write_bytes(world.ckpt.read_bytes()[:5000])
    _fails_cleanly(world, capsys, _test_ckpt(world, truncated), str(truncated), "truncated")


def test_random_bytes_as_checkpoint(world, capsys) -> None:
    garbage = world.root / "random.ckpt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    _fails_cleanly(world, capsys, _test_ckpt(world, garbage), str(garbage), "not a PyTorch checkpoint")


def test_missing_checkpoint_file(world, capsys) -> None:
    _fails_cleanly(world, capsys, _test_ckpt(world, world.root / "nope.ckpt"), "nope.ckpt", "--ckpt_path")


def test_lightning_checkpoint_of_another_framework(world, capsys) -> None:
    foreign = world.root / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 0, "global_step": 0,
                "pytorch-lightning_version": "2.6.6"}, foreign)
    _fails_cleanly(world, capsys, _test_ckpt(world, foreign), str(foreign), "not written by robustft")


def test_checkpoint_of_another_method_is_not_swapped_in(world, capsys) -> None:
    """The config names Classifier; the checkpoint says Finetune. Lightning's CLI would silently take the
    checkpoint's class; robustft refuses and says how to fix it."""
    checkpoint = torch.load(world.ckpt, map_location="cpu", weights_only=True)
    checkpoint["robustft"]["method"] = "robustft.methods.finetune.Finetune"
    checkpoint["hyper_parameters"]["_class_path"] = "robustft.methods.finetune.Finetune"
    other = world.root / "finetune.ckpt"
    torch.save(checkpoint, other)
    _fails_cleanly(world, capsys, _test_ckpt(world, other), "Finetune", "Classifier", "model.class_path")


# ------------------------------------------------------------------------------------------ runs
def test_fresh_fit_into_a_finished_run_is_refused(world, capsys) -> None:
    message = _fails_cleanly(world, capsys, ["fit", "--config", str(world.config)], str(world.run_dir / "checkpoints"),
                             "--ckpt_path last")
    assert "last.ckpt" in message
    assert not list((world.run_dir / "checkpoints").glob("last-v*.ckpt"))


def test_unwritable_report_dir(world, capsys) -> None:
    blocker = world.root / "a_file"
    blocker.write_text("not a folder")
    _fails_cleanly(world, capsys, ["evaluate", "--config", str(world.config), "--ckpt_path", str(world.ckpt),
                                   "--report_dir", str(blocker / "reports")], str(blocker))


def test_tuning_without_ood_validation_sets(world, capsys) -> None:
    _fails_cleanly(world, capsys, ["evaluate", "--config", str(world.config), "--ckpt_path", str(world.ckpt),
                                   "--report_dir", str(world.root / "tune_report"), "--tune", "true"], "data.ood_val")


def test_diverged_weights_are_named_as_the_model_not_the_score(world, capsys) -> None:
    out = world.root / "diverged"
    message = _fails_cleanly(world, capsys, _fit(world, "--model.init_args.optimizer.init_args.lr", "1e6", "--trainer.limit_train_batches",
                                                 "3", "--trainer.logger.init_args.save_dir", str(out)), "NaN", "step")
    assert "score function" not in message


def test_zero_devices(world, capsys) -> None:
    _fails_cleanly(world, capsys, _fit(world, "--trainer.devices", "0"), "devices")


# ------------------------------------------------------------------------------------------ a real process
@pytest.mark.slow  # two fresh interpreters
def test_python_m_robustft_prints_no_traceback_and_debug_shows_it(world) -> None:
    """The real entry point, in a subprocess: exit 2 with one line; ``--debug`` re-raises with the traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ROBUSTFT_DEBUG", None)
    args = [sys.executable, "-m", "robustft", "test", "--config", str(world.config), "--ckpt_path", WEIGHTS]
    plain = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2
    assert "Traceback" not in plain.stderr and "backbone_weights" in plain.stderr
    assert "LightningCLI's args parameter" not in plain.stderr  # robustft no longer causes that warning
    debug = subprocess.run([*args, "--debug"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "CheckpointFileError" in debug.stderr


def test_files_keep_the_users_umask(world) -> None:
    for path in (world.ckpt, world.run_dir / "ood_report" / "report.json"):
        mode = path.stat().st_mode & 0o777
        assert mode == 0o666 & ~_current_umask(), f"{path} has mode {oct(mode)}"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
