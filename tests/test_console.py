"""A clean console (issue 18): no Lightning advertising, no LightningCLI "args and command line arguments"
warning, no deprecation warning raised by robustft's own calls; real warnings still print.

Runs the real ``python -m robustft`` in subprocesses with every deprecation category shown
(``PYTHONWARNINGS``), so a deprecated call anywhere in robustft surfaces here, attributed to its file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "robustft"
SHOW_DEPRECATIONS = "default::DeprecationWarning,default::PendingDeprecationWarning,default::FutureWarning"
#: what must never print: Lightning's cloud advertising, LightningCLI's args warning, torch's LeafSpec
#: deprecation that Lightning 2.6 triggers on every run
NOISE = ("Tip:", "litlogger", "litmodels", "args and command line arguments", "LeafSpec")


def _config(tmp_path: Path) -> Path:
    def npz(path: str, n: int) -> dict:
        return {"source": "npz", "path": str(REPO / path), "max_samples": n}

    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1,
            "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path / "logs"), "name": "run", "version": ""}},
            "callbacks": [
                {"class_path": "robustft.callbacks.OODEvaluation", "init_args": {"every_n_epochs": 0, "plots": False}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}},
            ],
        },
        "model": {
            "class_path": "robustft.methods.Classifier",
            "init_args": {"num_classes": 10, "backbone": "cifar_resnet20",
                          "backbone_weights": str(REPO / "data/weights/resnet20-12fca82f.th"), "scores": ["msp"]},
        },
        "data": {
            "class_path": "robustft.data.OODDataModule",
            "init_args": {
                "train": npz("data/cifar10/cifar10_test_2k.npz", 40),
                "test": npz("data/cifar10/cifar10_test_2k.npz", 20),
                "ood": {"far": {"dtd": npz("data/dtd/dtd_10class_32.npz", 20)}},
                "batch_size": 16, "eval_batch_size": 32,
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": SHOW_DEPRECATIONS, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "robustft", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _own_deprecations(stderr: str) -> list[str]:
    """Warning blocks attributed to a file of the robustft package that mention a deprecation."""
    starts = list(re.finditer(r"^(\S+\.py):\d+: ", stderr, flags=re.M))
    blocks = []
    for i, match in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(stderr)
        if Path(match.group(1)).resolve().is_relative_to(PACKAGE) and re.search("deprecat", stderr[match.start():end], re.I):
            blocks.append(stderr[match.start():end])
    return blocks


@pytest.mark.slow
def test_fit_and_evaluate_print_no_noise_and_keep_real_warnings(tmp_path: Path) -> None:
    config = str(_config(tmp_path))
    fit = _run("fit", "--config", config)
    evaluate = _run("evaluate", "--config", config, "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
                    "--report_dir", str(tmp_path / "report"))
    for stderr in (fit, evaluate):
        assert [n for n in NOISE if n in stderr] == [], stderr
        assert _own_deprecations(stderr) == []
    # a real warning still prints: 3 training batches < Lightning's default log_every_n_steps (50)
    assert "log_every_n_steps" in fit
