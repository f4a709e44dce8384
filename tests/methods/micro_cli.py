"""Shared pieces of the methods' "CI evaluates a checkpoint" tests: a micro ``fit`` through the real CLI,
then ``evaluate`` of its ``last.ckpt``, compared with a report stored under ``tests/expected/``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from robustft.ood.report import compare_reports


def write_micro_config(config: dict[str, Any], tmp_path: Path, name: str) -> Path:
    """``config`` logging into ``tmp_path``: TensorBoard at ``tmp_path/tb`` (so ``last.ckpt`` is at
    ``tmp_path/tb/checkpoints/last.ckpt``), the per-epoch report in ``tmp_path/fit_report`` (no figures),
    and ``last.ckpt`` saved. Returns the written YAML's path."""
    config = json.loads(json.dumps(config))  # a deep copy: module-level configs stay untouched
    config["trainer"]["default_root_dir"] = str(tmp_path)
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                   "init_args": {"save_dir": str(tmp_path), "name": "tb", "version": ""}}
    config["trainer"]["callbacks"] = [
        {"class_path": "robustft.callbacks.OODEvaluation",
         "init_args": {"report_dir": str(tmp_path / "fit_report"), "plots": False}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
    ]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def assert_matches_expected_report(evaluated: dict[str, Any], expected: Path, atol: float = 2e-3) -> None:
    """CI's checkpoint evaluation: the micro run must reproduce the stored report (``meta`` aside: paths and
    timings). After an intended change, regenerate with ``ROBUSTFT_UPDATE_EXPECTED=1`` and say why in the
    commit."""
    if os.environ.get("ROBUSTFT_UPDATE_EXPECTED"):
        expected.write_text(json.dumps({k: v for k, v in evaluated.items() if k != "meta"}, indent=2) + "\n")
    assert compare_reports(json.loads(expected.read_text()), evaluated, atol=atol) == []
