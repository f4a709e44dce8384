"""Fault tolerance across ranks (DDP, 2 CPU processes, gloo): a fault on ONE rank ends the whole run
within a bounded time, with the cause named, and the run resumes from its last good checkpoint.

- SIGKILL of rank 1 mid-epoch: the launcher (rank 0) exits non-zero within 120 s, and ``fit --ckpt_path
  last`` ends with exactly the weights of an uninterrupted 2-process run.
- A NaN loss on rank 1 only: both ranks stop at the same step within 60 s; rank 1 raises the named error
  (term, step) and rank 0 stops with it, naming rank 1 and its message (``raise_on_any_rank``).
- A full disk (``ulimit -f`` reached mid-run) during a checkpoint save: an error naming the path and the
  cause, no temporary file left, and the previous ``last.ckpt`` loads and resumes (plus a fast unit test
  of the error raised by ``robustft.io.atomic_write``).

Every run uses the DDP strategy with a YAML ``timeout`` (as ``configs/trainer/slurm.yaml``) of 3 minutes,
longer than the bounds asserted here: the runs must end because of the fault handling, not the timeout.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from rft_dist_utils import (
    REPO,
    callback,
    cli_command,
    load_checkpoint,
    read_jsonl,
    run_cli,
    subprocess_env,
    tiny_config,
    wait_for,
    write_config,
)

from robustft.io import AtomicWriteError, atomic_write

STEPS_PER_EPOCH = 5  # 160 images / (2 ranks x 16)
DDP = {"class_path": "lightning.pytorch.strategies.DDPStrategy", "init_args": {"timeout": "0:03:00"}}


def _config(tmp_path: Path, name: str, extra_callbacks: list[dict], run: str | None = None, **trainer) -> Path:
    out = tmp_path / (run or name)
    callbacks = [
        callback("lightning.pytorch.callbacks.ModelCheckpoint", dirpath=str(out / "ckpt"),
                 every_n_train_steps=trainer.pop("every", 3), save_last=True),
        callback("rft_dist_utils.Recorder", path=str(out / "record")),
        *extra_callbacks,
    ]
    config = tiny_config(out, devices=2, callbacks=callbacks, scores=("msp",), trainer={
        "max_epochs": 2, "limit_train_batches": STEPS_PER_EPOCH, "limit_val_batches": 0, **trainer,
    })
    config["trainer"]["strategy"] = DDP
    return write_config(tmp_path / f"{name}.yaml", config)


def _start(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(cli_command("fit", "--config", str(config), *args), cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, float]:
    """Wait for ``proc``; return (its output, the wall-clock time it ended). Kill its group on timeout."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"the run did not end within {timeout}s after the fault\n{out[-6000:]}") from None
    return out, time.time()


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return
    # the launcher ended: no rank of its group may outlive it by more than a short teardown (a rank left
    # waiting in a collective would stay until the timeout)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("a rank of the run was still alive 15 s after the launcher ended")



def _marks(path: Path) -> dict[str, float]:
    return {r["what"]: r["time"] for r in read_jsonl(path)}


@pytest.mark.slow
def test_sigkill_of_rank_1_ends_the_run_and_ckpt_path_last_resumes_exactly(tmp_path: Path) -> None:
    killed_cfg = _config(tmp_path, "killed", [callback("rft_dist_utils.Throttle", seconds=0.3)])
    run = _start(killed_cfg)
    try:
        last = tmp_path / "killed" / "ckpt" / "last.ckpt"
        wait_for(last.exists, timeout=180, what="the first checkpoint", procs=[run])
        rank1 = next(r for r in read_jsonl(tmp_path / "killed" / "record.rank1") if r["event"] == "start")
        os.kill(rank1["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        out, _ = _finish(run, timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        _kill_group(run)
    print(f"SIGKILL rank 1: launcher exit {run.returncode} after {elapsed:.1f}s; "
          f"on disk: {sorted(p.name for p in last.parent.iterdir())}")
    assert run.returncode != 0 and elapsed < 120, out[-4000:]
    assert not [r for r in read_jsonl(tmp_path / "killed" / "record.rank0") if r["event"] == "end"]
    resumed_from = load_checkpoint(last)["global_step"]
    assert 0 < resumed_from < 2 * STEPS_PER_EPOCH and resumed_from % STEPS_PER_EPOCH != 0  # mid-epoch
    assert not list(last.parent.glob(".*.tmp"))

    run_cli("fit", "--config", str(killed_cfg), "--ckpt_path", "last")
    run_cli("fit", "--config", str(_config(tmp_path, "reference", [])))

    for rank in range(2):
        records = read_jsonl(tmp_path / "killed" / f"record.rank{rank}")
        assert [r["global_step"] for r in records if r["event"] == "start"] == [0, resumed_from]
        assert [r["global_step"] for r in records if r["event"] == "end"] == [2 * STEPS_PER_EPOCH]
    expected = load_checkpoint(tmp_path / "reference" / "ckpt" / "last.ckpt")["state_dict"]
    resumed = load_checkpoint(last)["state_dict"]
    assert expected.keys() == resumed.keys()
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert different == [], f"resumed weights differ from the uninterrupted run in {different[:5]}"


@pytest.mark.slow
def test_nan_loss_on_rank_1_only_stops_both_ranks_with_the_named_message(tmp_path: Path) -> None:
    marker = tmp_path / "marks.jsonl"
    config = _config(tmp_path, "nan", [callback("rft_dist_utils.NaNOnRank", rank=1, step=2, marker=str(marker))],
                     every=100)
    run = _start(config)
    try:
        out, ended = _finish(run, timeout=240)
    finally:
        _kill_group(run)
    elapsed = ended - _marks(marker)["nan"]
    print(f"NaN on rank 1: launcher exit {run.returncode} {elapsed:.1f}s after the NaN batch")
    assert run.returncode != 0, out[-4000:]
    assert elapsed < 60, out[-4000:]
    named = "training loss term 'ce' is nan at global step 2 (epoch 0)"
    assert f"{named}" in out and "[rank 1 of 2]" in out, out[-4000:]  # rank 1: its own error
    assert f"rank 1 of 2 reported: {named}" in out, out[-4000:]  # rank 0 stopped with it, naming the cause
    for rank in range(2):  # both ranks completed step 2 and no more; neither reached the end of training
        assert (tmp_path / "nan" / f"record.progress{rank}").read_text() == "2"
        assert not [r for r in read_jsonl(tmp_path / "nan" / f"record.rank{rank}") if r["event"] == "end"]


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_save_names_the_path_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "marks.jsonl"
    # checkpoints at steps 2, 4, ...; after step 3 no file may grow past 64 KiB (a checkpoint is ~1 MiB)
    full = _config(tmp_path, "full", [callback("rft_dist_utils.FileSizeLimit", after_step=3, max_bytes=64 * 1024,
                                               marker=str(marker))], run="run", every=2)
    ckpt_dir = tmp_path / "run" / "ckpt"
    run = _start(full)
    try:
        out, ended = _finish(run, timeout=240)
    finally:
        _kill_group(run)
    elapsed = ended - _marks(marker)["disk full"]
    on_disk = sorted(p.name for p in ckpt_dir.iterdir())
    print(f"full disk: launcher exit {run.returncode} {elapsed:.1f}s after the limit; on disk: {on_disk}")
    assert run.returncode != 0, out[-4000:]
    failed = ckpt_dir / "epoch=0-step=4.ckpt"
    assert f"could not write '{failed}': File too large (EFBIG)" in out, out[-4000:]
    assert on_disk == ["epoch=0-step=2.ckpt", "last.ckpt"]  # no temporary file, no half-written checkpoint
    assert load_checkpoint(ckpt_dir / "last.ckpt")["global_step"] == 2

    # the same run without the limit resumes from the previous last.ckpt and finishes
    resume = _config(tmp_path, "resume", [], run="run", every=2)
    run_cli("fit", "--config", str(resume), "--ckpt_path", "last")
    records = read_jsonl(tmp_path / "run" / "record.rank0")
    assert [r["global_step"] for r in records if r["event"] == "start"] == [0, 2]
    assert [r["global_step"] for r in records if r["event"] == "end"] == [2 * STEPS_PER_EPOCH]


def test_a_failed_write_names_the_path_and_the_cause_and_keeps_the_previous_file(tmp_path: Path) -> None:
    """What ``torch.save`` raises on a full disk: an opaque RuntimeError whose context is the OSError."""
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"previous")

    def full_disk(handle) -> None:
        handle.write(b"half a checkpoint")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    with pytest.raises(AtomicWriteError, match=rf"could not write '{target}': No space left on device \(ENOSPC\); "
                       r".* MiB free .*; the previous last.ckpt is unchanged") as info:
        atomic_write(target, full_disk)
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    with pytest.raises(ValueError):  # not an OS error: raised unchanged
        atomic_write(target, lambda handle: (_ for _ in ()).throw(ValueError("not a write error")))
