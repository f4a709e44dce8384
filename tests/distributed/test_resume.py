"""Resume: a run SIGKILLed mid-epoch and resumed with ``fit --ckpt_path last`` ends with exactly the
weights of an uninterrupted run; checkpoint writes are atomic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rft_dist_utils import (
    REPO,
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

from robustft.checkpointing import AtomicCheckpointIO

STEPS_PER_EPOCH = 5
EPOCHS = 2


def _config(tmp_path: Path, name: str, throttle: float | None) -> Path:
    out = tmp_path / name
    callbacks = [
        callback("lightning.pytorch.callbacks.ModelCheckpoint", dirpath=str(out / "ckpt"), every_n_train_steps=3,
                 save_last=True),
        callback("rft_dist_utils.Recorder", path=str(out / "record")),
    ]
    if throttle:
        callbacks.append(callback("rft_dist_utils.Throttle", seconds=throttle))
    # augmentation stays on (crop_flip): the resumed run must also redraw the same random crops
    config = tiny_config(out, callbacks=callbacks, scores=("msp",), trainer={
        "max_epochs": EPOCHS, "limit_train_batches": STEPS_PER_EPOCH, "limit_val_batches": 1,
    })
    return write_config(tmp_path / f"{name}.yaml", config)



@pytest.mark.slow
def test_sigkill_mid_epoch_then_ckpt_path_last_resumes_exactly(tmp_path: Path) -> None:
    reference_cfg = _config(tmp_path, "reference", throttle=None)
    killed_cfg = _config(tmp_path, "killed", throttle=0.3)
    env = subprocess_env()
    reference = start_fit(reference_cfg, env)
    last = tmp_path / "killed" / "ckpt" / "last.ckpt"
    fit_and_sigkill_after_first_checkpoint(killed_cfg, last, env)
    assert not [r for r in read_jsonl(tmp_path / "killed" / "record.rank0") if r["event"] == "end"]
    resumed_from = load_checkpoint(last)["global_step"]
    assert 0 < resumed_from < STEPS_PER_EPOCH * EPOCHS and resumed_from % STEPS_PER_EPOCH != 0  # mid-epoch

    run_cli("fit", "--config", str(killed_cfg), "--ckpt_path", "last", env=env)
    out, _ = reference.communicate(timeout=240)
    assert reference.returncode == 0, out[-6000:]

    starts = [r for r in read_jsonl(tmp_path / "killed" / "record.rank0") if r["event"] == "start"]
    assert [s["global_step"] for s in starts] == [0, resumed_from]
    ends = [r["global_step"] for r in read_jsonl(tmp_path / "killed" / "record.rank0") if r["event"] == "end"]
    assert ends == [STEPS_PER_EPOCH * EPOCHS]

    expected = load_checkpoint(tmp_path / "reference" / "ckpt" / "last.ckpt")["state_dict"]
    resumed = load_checkpoint(last)["state_dict"]
    assert expected.keys() == resumed.keys()
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert different == [], f"resumed weights differ from the uninterrupted run in {different[:5]}"


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_atomic_checkpoint_io_never_leaves_a_truncated_target(tmp_path: Path, monkeypatch, error) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"weights": torch.arange(4.0)}, target)
    original = target.read_bytes()

    def dies_half_way(obj, handle, *args, **kwargs) -> None:
        handle.write(b"\x80\x02 half a checkpoint")
        handle.flush()
        raise error

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(type(error)):
        io.save_checkpoint({"weights": torch.arange(1000.0)}, target)
    with pytest.raises(type(error)):
        io.save_checkpoint({"weights": torch.arange(1000.0)}, tmp_path / "new.ckpt")
    assert target.read_bytes() == original  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file, no partial new file

    monkeypatch.undo()
    io.save_checkpoint({"weights": torch.arange(5.0)}, target)
    assert torch.equal(torch.load(target)["weights"], torch.arange(5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_fresh_resumable_loader_draws_what_a_shuffled_dataloader_draws() -> None:
    """No resume: same order and same random augmentations as ``DataLoader(shuffle=True, generator=...)``,
    so switching the datamodule to the resumable loader changed no result."""
    from torch.utils.data import DataLoader
    from torchvision import transforms as T

    from robustft.data import DatasetSpec, IndexedDataset, load_dataset
    from robustft.data.resumable import resumable_train_loader

    images = load_dataset(DatasetSpec(source="npz", path=str(REPO / "data/cifar10/cifar10_test_2k.npz"),
                                      max_samples=50), "data.train")
    dataset = IndexedDataset(images, T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()]))

    def epochs(loader) -> list[tuple[list[int], float]]:
        torch.manual_seed(0)
        return [(b["index"].tolist(), float(b["image"].sum())) for _ in range(2) for b in loader]

    plain = DataLoader(dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
    assert epochs(resumable_train_loader(dataset, 8, seed=3)) == epochs(plain)
