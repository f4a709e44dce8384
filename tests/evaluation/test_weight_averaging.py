"""The ``WeightAveraging`` callback sweeps on the training device, before teardown, and writes atomically."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from robustft.callbacks import weight_averaging
from robustft.callbacks.weight_averaging import WeightAveraging
from robustft.checkpointing import inspect_checkpoint
from robustft.data import DatasetSpec, OODDataModule
from robustft.evaluation.sweep import SweepResult
from robustft.evaluation.sweep_report import write_sweep
from robustft.methods import Classifier

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
WEIGHTS = str(DATA / "weights" / "resnet20-12fca82f.th")


def _datamodule() -> OODDataModule:
    def spec(path: Path, n: int) -> DatasetSpec:
        return DatasetSpec(source="npz", path=str(path), max_samples=n)

    return OODDataModule(
        train=spec(DATA / "cifar10" / "cifar10_train_5k_jpeg.npz", 64),
        test=spec(DATA / "cifar10" / "cifar10_test_2k.npz", 48),
        ood={"far": {"dtd": spec(DATA / "dtd" / "dtd_10class_32.npz", 32)}},
        val_fraction=0.25,
        batch_size=16,
        eval_batch_size=64,
    )


def test_sweep_runs_on_the_training_device_before_teardown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Classifier(num_classes=10, backbone="cifar_resnet20", backbone_weights=WEIGHTS, scores=["msp"])
    callback = WeightAveraging(alphas=[0.0, 1.0], corruptions=[], save_alpha=0.5, report_dir=str(tmp_path / "avg"))
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )
    events: list[str] = []
    teardown = trainer.strategy.teardown

    def recording_teardown() -> None:
        events.append("teardown")
        teardown()

    monkeypatch.setattr(trainer.strategy, "teardown", recording_teardown)
    real_sweep = weight_averaging.run_sweep
    seen: list[dict] = []

    def spy(module, datamodule, theta0, theta1, settings, device, meta=None):
        events.append("sweep")
        seen.append({
            "parameters": next(module.parameters()).device,
            "root": trainer.strategy.root_device,
            "device": torch.device(device),
            "stage": trainer.state.stage,
            "attached": module._trainer is trainer,
        })
        return real_sweep(module, datamodule, theta0, theta1, settings, device, meta)

    monkeypatch.setattr(weight_averaging, "run_sweep", spy)
    trainer.fit(model, datamodule=_datamodule())

    assert events == ["sweep", "teardown"]  # on_fit_end would come after the strategy's teardown
    (call,) = seen
    assert call["parameters"] == call["root"] == call["device"]
    assert call["stage"] == "train" and call["attached"]
    rows = json.loads((tmp_path / "avg" / "average.json").read_text())["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    # the chosen model is an ordinary robustft checkpoint of this method, with its provenance
    ckpt = tmp_path / "avg" / "averaged_alpha0.50.ckpt"
    assert callback.checkpoint_path == ckpt and inspect_checkpoint(ckpt).method.endswith("Classifier")
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert stored["robustft"]["averaging"]["alpha"] == 0.5 and "optimizer_states" not in stored
    assert not list((tmp_path / "avg").glob(".*.tmp"))


def test_sweep_files_are_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails before the file is complete leaves the previous table, not a truncated one."""
    import robustft.io

    result = SweepResult(rows=[{"alpha": 0.0, "id_acc": 0.5}, {"alpha": 1.0, "id_acc": 0.75}], reports=[None, None], meta={})
    previous = tmp_path / "average.json"
    previous.write_text("previous table\n")

    def failing_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(robustft.io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_sweep(result, tmp_path)
    assert previous.read_text() == "previous table\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["average.json"]
    monkeypatch.undo()
    paths = write_sweep(result, tmp_path)
    assert json.loads(paths["json"].read_text())["rows"] == result.rows and paths["png"].stat().st_size > 0
