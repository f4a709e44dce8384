"""Resume with an unlabelled stream: a run with ``data.unlabeled`` (CombinedLoader) SIGKILLed mid-epoch and
resumed with ``fit --ckpt_path last`` ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rft_dist_utils import (
    callback,
    fit_and_sigkill_after_first_checkpoint,
    load_checkpoint,
    read_jsonl,
    run_cli,
    start_fit,
    subprocess_env,
    tiny_config,
    write_config,
)

STEPS_PER_EPOCH = 5
EPOCHS = 2
UNLABELED = 37  # 8 per batch: 5 batches per unlabelled epoch, so the 10 steps cross an unlabelled epoch


def _config(tmp_path: Path, name: str, throttle: float | None) -> Path:
    """Checkpoints every 2 steps, so ``last.ckpt`` of a finished run holds its final step (10)."""
    out = tmp_path / name
    callbacks = [
        callback("lightning.pytorch.callbacks.ModelCheckpoint", dirpath=str(out / "ckpt"), every_n_train_steps=2,
                 save_last=True),
        callback("rft_dist_utils.Recorder", path=str(out / "record")),
    ]
    if throttle:
        callbacks.append(callback("rft_dist_utils.Throttle", seconds=throttle))
    config = tiny_config(out, callbacks=callbacks, scores=("msp",), trainer={
        "max_epochs": EPOCHS, "limit_train_batches": STEPS_PER_EPOCH, "limit_val_batches": 1,
    }, data={
        "unlabeled": {"tin": {"source": "npz", "path": "data/tinyimagenet/tin_val_32.npz", "max_samples": UNLABELED}},
        "unlabeled_batch_size": 8,
    })
    # the test-only method that trains on the unlabelled batch (crop_flip stays on for both streams)
    config["model"] = {
        "class_path": "rft_unlabeled_method.EntropyOnUnlabeled",
        "init_args": {
            "num_classes": 10,
            "backbone": "cifar_resnet20",
            "backbone_weights": "data/weights/resnet20-12fca82f.th",
            "scores": ["msp"],
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.9}},
        },
    }
    return write_config(tmp_path / f"{name}.yaml", config)



@pytest.mark.slow
def test_sigkill_mid_epoch_with_an_unlabelled_stream_resumes_exactly(tmp_path: Path) -> None:
    reference_cfg = _config(tmp_path, "reference", throttle=None)
    killed_cfg = _config(tmp_path, "killed", throttle=0.3)
    env = subprocess_env()
    reference = start_fit(reference_cfg, env)
    last = tmp_path / "killed" / "ckpt" / "last.ckpt"
    fit_and_sigkill_after_first_checkpoint(killed_cfg, last, env)
    saved = load_checkpoint(last)
    resumed_from = saved["global_step"]
    assert 0 < resumed_from < STEPS_PER_EPOCH * EPOCHS and resumed_from % STEPS_PER_EPOCH != 0  # mid-epoch
    # the checkpoint holds both streams' positions; the unlabelled one counts every batch trained on
    data_state = saved["OODDataModule"]
    assert data_state["unlabeled_loader"]["batches_done"] == resumed_from
    assert data_state["train_loader"]["batches_done"] == resumed_from % STEPS_PER_EPOCH

    run_cli("fit", "--config", str(killed_cfg), "--ckpt_path", "last", env=env)
    out, _ = reference.communicate(timeout=240)
    assert reference.returncode == 0, out[-6000:]

    starts = [r for r in read_jsonl(tmp_path / "killed" / "record.rank0") if r["event"] == "start"]
    assert [s["global_step"] for s in starts] == [0, resumed_from]
    expected = load_checkpoint(tmp_path / "reference" / "ckpt" / "last.ckpt")
    resumed = load_checkpoint(last)
    assert resumed["global_step"] == expected["global_step"] == STEPS_PER_EPOCH * EPOCHS
    assert expected["OODDataModule"]["unlabeled_loader"]["batches_done"] == STEPS_PER_EPOCH * EPOCHS
    assert resumed["OODDataModule"]["unlabeled_loader"]["batches_done"] == STEPS_PER_EPOCH * EPOCHS
    assert expected["state_dict"].keys() == resumed["state_dict"].keys()
    different = [k for k in expected["state_dict"] if not torch.equal(expected["state_dict"][k], resumed["state_dict"][k])]
    assert different == [], f"resumed weights differ from the uninterrupted run in {different[:5]}"
