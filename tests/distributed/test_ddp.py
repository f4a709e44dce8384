"""Exact distributed evaluation: DDP on 2 CPU processes (gloo) reports what 1 process reports.

Lightning's own DistributedSampler would pad the uneven sets used here (101 ID test images, 61/41/33
OOD images) with repeated samples; robustft's ShardSampler + gather_by_index must count each sample
exactly once, so the 2-process report equals the 1-process one to 1e-6 with identical counts.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from rft_dist_utils import callback, free_port, gather_worker, run_cli, tiny_config, write_config

from robustft.ood.report import compare_reports

pytestmark = pytest.mark.slow


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def test_shard_sampler_and_gather_cover_every_index_once(tmp_path: Path) -> None:
    """2 gloo processes: uneven sizes (7 -> 4 + 3, 1 -> 1 + 0) are split disjointly, without padding,
    and gathered back in order on every rank; a duplicated index is refused."""
    sizes = [7, 1, 2, 0]
    # fork: the children inherit the imported modules (a spawn would re-import torch and robustft twice)
    mp.start_processes(gather_worker, args=(2, free_port(), sizes, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for size in sizes:
        local = [ranks[r][str(size)]["local"] for r in range(2)]
        assert sorted(local[0] + local[1]) == list(range(size))  # each index exactly once
        assert not set(local[0]) & set(local[1])
        assert [ranks[r][str(size)]["len"] for r in range(2)] == [len(local[0]), len(local[1])]
        for r in range(2):
            assert ranks[r][str(size)]["gathered_index"] == list(range(size))
            # every output row travelled with its own index from the rank that computed it
            assert ranks[r][str(size)]["gathered_rank"] == [i % 2 for i in range(size)]
            assert ranks[r][str(size)]["logits_shape"] == [size, 3]
    assert ranks[0]["7"]["local"] == [0, 2, 4, 6] and ranks[1]["7"]["local"] == [1, 3, 5]
    assert all(r["duplicate_refused"] for r in ranks)


def _csv_logger(tmp_path: Path, name: str) -> dict:
    return {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path / "csv"), "name": name, "version": ""}}}


def _logged(tmp_path: Path, name: str) -> dict[str, float]:
    """The last value of every metric the run's CSVLogger wrote (rank 0's file; the CLI names the version
    after the subcommand for test / evaluate)."""
    values: dict[str, float] = {}
    (path,) = (tmp_path / "csv" / name).rglob("metrics.csv")
    with path.open() as handle:
        for row in csv.DictReader(handle):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def test_eval_loaders_get_an_unpadded_distributed_sampler_only_under_ddp() -> None:
    """The datamodule hands Lightning a ``DistributedSampler`` subclass (so Lightning keeps it instead of
    injecting its padded one) that yields ``rank::world_size`` without repeats; one process: none."""
    from types import SimpleNamespace

    from torch.utils.data.distributed import DistributedSampler

    from robustft.data import DatasetSpec, OODDataModule
    from robustft.evaluation.distributed import UnpaddedDistributedSampler

    shards = [list(UnpaddedDistributedSampler(range(7), 2, rank)) for rank in range(2)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]
    assert [len(UnpaddedDistributedSampler(range(7), 2, rank)) for rank in range(2)] == [4, 3]
    module = OODDataModule(train=DatasetSpec(source="npz", path="data/cifar10/cifar10_test_2k.npz", max_samples=20),
                           test=DatasetSpec(source="npz", path="data/cifar10/cifar10_test_2k.npz", max_samples=7))
    assert module._distributed_eval_sampler(range(7)) is None  # no trainer: Lightning's default
    module.trainer = SimpleNamespace(world_size=2, global_rank=1)
    sampler = module._distributed_eval_sampler(range(7))
    assert isinstance(sampler, DistributedSampler) and list(sampler) == [1, 3, 5]


def test_ddp_fit_and_test_reports_equal_single_process_evaluate(tmp_path: Path) -> None:
    """``fit`` and ``test`` with strategy ddp on 2 CPU processes, then 1-process ``evaluate`` of the same
    checkpoint: identical OOD reports (same n per set, metrics within 1e-6), and ``test/acc`` counts every
    one of the 101 ID test images once: 2-process ``test/acc`` == its report's ``id.acc`` == 1-process
    ``test/acc``. Lightning's padding sampler counted image 0 twice (102 samples) and its ``sync_dist``
    mean averaged per-rank means (measured 0.804 against id.acc 0.822 on 45 images)."""
    ckpt_dir = tmp_path / "ckpt"
    ddp = {"devices": 2, "strategy": "ddp"}
    data = {"val_fraction": 0.11875}  # 19 of the 160 training images: ranks read 10 + 9
    fit_cfg = write_config(tmp_path / "fit.yaml", tiny_config(tmp_path / "run", **ddp, data=data, callbacks=[
        callback("robustft.callbacks.OODEvaluation", every_n_epochs=1, report_dir=str(tmp_path / "fit_report"),
                 plots=False),
        callback("lightning.pytorch.callbacks.ModelCheckpoint", dirpath=str(ckpt_dir), save_last=True),
    ], trainer=_csv_logger(tmp_path, "fit")))
    run_cli("fit", "--config", str(fit_cfg))
    ckpt = ckpt_dir / "last.ckpt"
    assert ckpt.is_file()

    test_cfg = write_config(tmp_path / "test.yaml", tiny_config(tmp_path / "run_test", **ddp, data=data, callbacks=[
        callback("robustft.callbacks.OODEvaluation", every_n_epochs=0, report_dir=str(tmp_path / "test_report"),
                 plots=False),
    ], trainer=_csv_logger(tmp_path, "test")))
    run_cli("test", "--config", str(test_cfg), "--ckpt_path", str(ckpt))

    single_cfg = write_config(tmp_path / "single.yaml", tiny_config(tmp_path / "run_single", data=data,
                                                                    trainer=_csv_logger(tmp_path, "single")))
    run_cli("evaluate", "--config", str(single_cfg), "--ckpt_path", str(ckpt),
            "--report_dir", str(tmp_path / "eval_report"))

    single = _report(tmp_path / "eval_report")
    fit_report, test_report = _report(tmp_path / "fit_report"), _report(tmp_path / "test_report")
    assert single["meta"]["world_size"] == 1
    assert fit_report["meta"]["world_size"] == 2 and test_report["meta"]["world_size"] == 2
    # uneven sizes, counted once each (a padding sampler would report 102 / 62 / 42 / 34)
    assert single["id"]["n"] == test_report["id"]["n"] == 101
    for name, n in {"tin": 61, "mnist": 41, "dtd": 33}.items():
        for score in ("msp", "energy", "knn"):
            assert test_report["ood"][name][score]["n"] == n
    assert compare_reports(test_report, single, atol=1e-6) == []
    # the per-epoch report at the end of the DDP fit was computed on the weights saved in last.ckpt
    assert compare_reports(fit_report, single, atol=1e-6) == []

    # test/acc: every ID test image counted once, on 2 processes as on 1 (float32-logged correct / n)
    ddp_test, single_test = _logged(tmp_path, "test"), _logged(tmp_path, "single")
    id_acc = test_report["id"]["acc"]
    assert single["id"]["acc"] == id_acc and 0 < id_acc < 1  # else padding could not change the value
    assert ddp_test["test/acc"] == pytest.approx(id_acc, abs=1e-7)
    assert ddp_test["test/acc"] == ddp_test["id/acc"] == single_test["test/acc"]
    assert ddp_test["test/loss"] == pytest.approx(single_test["test/loss"], rel=1e-5)  # a sum / n, not a mean of means
    # val/acc over the 19 validation images (10 + 9 per rank) is a multiple of 1/19: not a padded /20 count
    # nor a mean of the two ranks' means
    val_acc = _logged(tmp_path, "fit")["val/acc"]
    assert 0 < val_acc < 1 and abs(val_acc * 19 - round(val_acc * 19)) < 1e-5


def test_ddp_fit_with_default_report_dir_and_logger_does_not_hang(tmp_path: Path) -> None:
    """2 CPU processes, OODEvaluation with the default ``report_dir`` (under ``trainer.log_dir``, which
    broadcasts) and a TensorBoard logger: every rank must reach every collective. Before the fix rank 0
    alone read ``log_dir`` and the job deadlocked; the timeout turns a regression into a failure."""
    config = tiny_config(tmp_path / "run", devices=2, strategy="ddp", callbacks=[
        callback("robustft.callbacks.OODEvaluation", every_n_epochs=1),
        callback("lightning.pytorch.callbacks.ModelCheckpoint", save_last=True),
    ], trainer={"logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                           "init_args": {"save_dir": str(tmp_path / "logs"), "name": "tb", "version": ""}}})
    run_cli("fit", "--config", str(write_config(tmp_path / "fit.yaml", config)), timeout=150)
    log_dir = tmp_path / "logs" / "tb"
    report = _report(log_dir / "ood_report")
    assert report["meta"]["world_size"] == 2 and report["id"]["n"] == 101
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
