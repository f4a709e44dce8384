"""Drive the real LightningCLI in-process on the bundled real data (torchgeo style)."""

from __future__ import annotations

import json
from argparse import ArgumentError
from pathlib import Path

import pytest
import torch

from robustft.checkpointing import CheckpointFileError
from robustft.cli import main
from robustft.data import DataConfigError
from robustft.methods.base import ConfigMismatchError
from robustft.ood.report import ReportDirError, compare_reports

REPO = Path(__file__).resolve().parents[1]
CONFIG = "tests/conf/tiny_classifier.yaml"
EXPECTED = REPO / "tests" / "expected" / "tiny_classifier_report.json"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # configs use repo-relative data paths


def _run(subcommand: str, out: Path, *extra: str) -> object:
    return main([subcommand, "--config", CONFIG, "--trainer.logger.init_args.save_dir", str(out), *extra])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real ``fit`` (3 steps, per-epoch OOD evaluation) shared by the tests of this module."""
    out = tmp_path_factory.mktemp("fit")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        _run("fit", out)
    return out / "tb"


def test_fit_writes_checkpoint_and_per_epoch_report(fitted: Path) -> None:
    assert (fitted / "checkpoints" / "last.ckpt").is_file()
    report = json.loads((fitted / "ood_report" / "report.json").read_text())
    assert report["id"]["n"] == 400
    assert set(report["ood"]) == {"tin", "mnist", "dtd"}
    assert set(report["groups"]) == {"near", "far"}
    assert set(report["ood"]["tin"]) == {"msp", "energy", "knn", "react"}
    assert report["ood"]["mnist"]["msp"]["n"] == 200
    # the real ResNet-20 separates CIFAR-10 from textures and digits far above chance
    for set_name in ("tin", "mnist", "dtd"):
        assert report["ood"][set_name]["msp"]["auroc"] > 0.7
    assert (fitted / "config.yaml").is_file()


def test_callback_report_equals_evaluate_of_the_same_checkpoint(fitted: Path, tmp_path: Path) -> None:
    ckpt = fitted / "checkpoints" / "last.ckpt"
    _run("evaluate", tmp_path, "--ckpt_path", str(ckpt), "--report_dir", str(tmp_path / "rep"))
    during_fit = json.loads((fitted / "ood_report" / "report.json").read_text())
    evaluated = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert compare_reports(during_fit, evaluated, atol=1e-6) == []
    assert {p.name for p in (tmp_path / "rep").iterdir()} >= {"report.json", "report.csv", "report.md"}


def test_checkpoint_report_matches_stored_expectation(fitted: Path, tmp_path: Path) -> None:
    """CI's checkpoint evaluation: a freshly trained tiny model must reproduce the stored report."""
    ckpt = fitted / "checkpoints" / "last.ckpt"
    _run("evaluate", tmp_path, "--ckpt_path", str(ckpt), "--report_dir", str(tmp_path / "rep"))
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    expected = json.loads(EXPECTED.read_text())
    assert compare_reports(expected, report, atol=2e-3) == []


def test_test_subcommand_runs_on_checkpoint(fitted: Path, tmp_path: Path) -> None:
    cli = _run("test", tmp_path, "--ckpt_path", str(fitted / "checkpoints" / "last.ckpt"))
    metrics = cli.trainer.callback_metrics
    assert 0.7 < float(metrics["test/acc"]) <= 1.0
    assert float(metrics["id/acc"]) == pytest.approx(float(metrics["test/acc"]), abs=1e-6)
    assert "ood/far/msp/auroc" in metrics and "ood/tin/knn/fpr95" in metrics


def test_evaluate_takes_the_method_from_the_checkpoint(fitted: Path, tmp_path: Path) -> None:
    config = tmp_path / "data_only.yaml"
    config.write_text(
        f"trainer: {{accelerator: cpu, logger: false, enable_progress_bar: false, default_root_dir: {tmp_path}}}\n"
        "data:\n  class_path: robustft.data.OODDataModule\n  init_args:\n"
        "    train: {source: npz, path: data/cifar10/cifar10_train_5k_jpeg.npz, max_samples: 600}\n"
        "    test: {source: npz, path: data/cifar10/cifar10_test_2k.npz, max_samples: 400}\n"
        "    ood: {far: {dtd: {source: npz, path: data/dtd/dtd_10class_32.npz, max_samples: 200}}}\n"
    )
    main(["evaluate", "--config", str(config), "--ckpt_path", str(fitted / "checkpoints" / "last.ckpt"),
          "--report_dir", str(tmp_path / "rep")])
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert set(report["ood"]) == {"dtd"} and set(report["ood"]["dtd"]) == {"msp", "energy", "knn", "react"}


def test_evaluate_can_change_scores_of_a_checkpoint(fitted: Path, tmp_path: Path) -> None:
    _run("evaluate", tmp_path, "--ckpt_path", str(fitted / "checkpoints" / "last.ckpt"),
         "--model.init_args.scores", "[gen, mds]", "--report_dir", str(tmp_path / "rep"))
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert set(report["ood"]["tin"]) == {"gen", "mds"}


def test_evaluate_plain_weights_file_without_checkpoint(tmp_path: Path) -> None:
    """The real ResNet-20 weights, loaded through the backbone, evaluated without any training."""
    _run("evaluate", tmp_path, "--report_dir", str(tmp_path / "rep"), "--model.init_args.scores", "[msp, energy]")
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["id"]["acc"] > 0.75
    for set_name in ("tin", "mnist", "dtd"):
        assert report["ood"][set_name]["msp"]["auroc"] > 0.7
    # `evaluate` writes the figures beside the report and report.md links them (tests/test_plots.py: contents)
    markdown = (tmp_path / "rep" / "report.md").read_text()
    for name in ("roc_tin", "roc_mnist", "roc_dtd", "hist_mnist_energy"):
        assert (tmp_path / "rep" / "figures" / f"{name}.png").is_file() and f"](figures/{name}.png)" in markdown


def test_print_config_shows_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIG, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "robustft.methods.Classifier" in printed and "cifar_resnet20" in printed


# ---------------------------------------------------------------------------------------- bad input
def test_wrong_config_key_names_the_key(tmp_path: Path) -> None:
    # main() raises (the library API); `python -m robustft` turns it into one short message (test_bad_input.py)
    with pytest.raises(ArgumentError, match="lrate"):
        _run("fit", tmp_path, "--model.init_args.lrate", "0.1")


def test_wrong_dataset_key_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match="pth"):
        _run("fit", tmp_path, "--data.init_args.train", "{source: npz, pth: x.npz}")


def test_missing_data_path_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(DataConfigError, match=r"data\.train\.path: 'nowhere/x\.npz' does not exist"):
        _run("fit", tmp_path, "--data.init_args.train", "{source: npz, path: nowhere/x.npz}")


def test_class_count_mismatch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigMismatchError, match="model.num_classes is 5 .* 10 classes"):
        _run("fit", tmp_path, "--model.init_args.num_classes", "5")


def test_misspelt_score_is_refused_before_training(tmp_path: Path) -> None:
    # raised while the CLI instantiates the model; jsonargparse re-raises it as ValueError with our message
    with pytest.raises(ValueError, match="model.scores: Unknown OOD score 'enrgy'. Did you mean 'energy'"):
        _run("fit", tmp_path, "--model.init_args.scores", "[msp, enrgy]")


def test_empty_ood_set_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataConfigError, match=r"data\.ood\.far\.dtd: .* empty"):
        _run("fit", tmp_path, "--data.init_args.ood.far.dtd",
             "{source: npz, path: data/dtd/dtd_10class_32.npz, exclude_classes: [0,1,2,3,4,5,6,7,8,9]}")


def test_unwritable_report_dir_is_refused_before_evaluation(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ReportDirError, match="file"):
        _run("evaluate", tmp_path, "--report_dir", str(blocker / "reports"))


def test_foreign_checkpoint_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 0, "global_step": 0,
                "pytorch-lightning_version": "2.6.6"}, foreign)
    with pytest.raises(CheckpointFileError, match="not written by robustft"):
        _run("evaluate", tmp_path, "--ckpt_path", str(foreign), "--report_dir", str(tmp_path / "rep"))


def test_unreadable_checkpoint_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointFileError, match="garbage.ckpt.*not a PyTorch checkpoint"):
        _run("evaluate", tmp_path, "--ckpt_path", str(garbage), "--report_dir", str(tmp_path / "rep"))
