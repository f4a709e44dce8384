"""SLURM on localhost: the sbatch templates run under a fake ``srun`` (one process per task with the
variables srun sets) and a fake ``scontrol`` (records its arguments).

- 2 "nodes" x 1 task form one gloo process group through Lightning's SLURMEnvironment and train in sync.
- SIGUSR1 (what ``#SBATCH --signal=SIGUSR1@90`` sends) makes Lightning save ``hpc_ckpt_1.ckpt`` in the
  stable ``runs/<job name>`` and call ``scontrol requeue <job id>``; the requeued job (same script, same
  variables) resumes from that checkpoint's global step. The signal part uses a 1-task job: on a 2-core
  CI machine two ranks receiving the signal at different points of a step make the hpc save (which has a
  barrier) flaky, so the 2-task job covers process-group formation and synchronised training only.
- The templates launch ``srun --kill-on-bad-exit=1`` (the fake srun honours it): when one task of a
  2-"node" job exits non-zero while the other stalls outside any collective, srun ends the other task and
  the job within seconds, with the failing task's exit code.
- ``configs/trainer/slurm.yaml`` sets the DDP strategy's collective ``timeout`` (10 min), parsed from YAML.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from rft_dist_utils import (
    REPO,
    callback,
    free_port,
    read_jsonl,
    subprocess_env,
    tiny_config,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow

SLURM_DIR = REPO / "tools" / "slurm"

FAKE_SRUN = """#!/bin/bash
# fake srun: start SLURM_NTASKS copies of the command here, with the variables srun gives each task.
# --kill-on-bad-exit[=1] / -K: when a task exits non-zero, the other tasks get SIGTERM and, if still alive
# FAKE_SRUN_KILL_WAIT seconds later (SLURM's KillWait), SIGKILL; srun exits with the failing task's code.
kill_on_bad_exit=0
while [ $# -gt 0 ]; do
  case "$1" in
    --kill-on-bad-exit|--kill-on-bad-exit=1|-K|-K1) kill_on_bad_exit=1; shift ;;
    --kill-on-bad-exit=0|-K0) kill_on_bad_exit=0; shift ;;
    -*) echo "fake srun: unsupported option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
n=${SLURM_NTASKS:-1}; per=${SLURM_NTASKS_PER_NODE:-1}; pids=()
for ((i = 0; i < n; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % per)) SLURM_NODEID=$((i / per)) "$@" &
  pids+=($!)
done
rc=0
for ((left = n; left > 0; left--)); do
  wait -n; status=$?
  [ "$status" -eq 0 ] && continue
  [ "$rc" -eq 0 ] && rc=$status
  echo "srun: error: a task exited with exit code $status" >&2
  [ "$kill_on_bad_exit" = 1 ] || continue
  echo "srun: --kill-on-bad-exit: terminating the other tasks of the step" >&2
  kill -TERM "${pids[@]}" 2>/dev/null
  for ((t = 0; t < ${FAKE_SRUN_KILL_WAIT:-3} * 10; t++)); do
    [ -n "$(jobs -rp)" ] || break
    sleep 0.1
  done
  kill -KILL "${pids[@]}" 2>/dev/null
  wait
  exit "$rc"
done
exit "$rc"
"""

FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "$SCONTROL_LOG"
"""


def _fake_slurm_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _slurm_env(tmp_path: Path, job_id: str, job_name: str, nodes: int, tasks_per_node: int) -> dict[str, str]:
    """Job-level variables of an allocation; the fake srun adds the per-task ones."""
    bin_dir = _fake_slurm_bin(tmp_path)
    return subprocess_env(
        PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        SLURM_JOB_ID=job_id,
        SLURM_JOB_NAME=job_name,
        SLURM_NNODES=str(nodes),
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_NTASKS=str(nodes * tasks_per_node),
        SLURM_NTASKS_PER_NODE=str(tasks_per_node),
        SLURM_NODELIST="127.0.0.1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        SLURM_CPUS_PER_TASK="1",
        RUN_ROOT=str(tmp_path / "runs"),
        SCONTROL_LOG=str(tmp_path / "scontrol.log"),
    )


def _sbatch(template: str, config: Path, env: dict[str, str]) -> subprocess.Popen:
    """What the batch step does: run the template (the fake srun starts the tasks). CPU instead of GPUs."""
    return subprocess.Popen(["bash", str(SLURM_DIR / template), str(config), "--trainer.accelerator", "cpu"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _sbatch_options(template: str) -> dict[str, str]:
    text = (SLURM_DIR / template).read_text()
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))


@pytest.mark.parametrize("template", ["single_node.sbatch", "multi_node.sbatch"])
def test_sbatch_templates_follow_the_lightning_rules(template: str) -> None:
    options = _sbatch_options(template)
    assert options["signal"] == "SIGUSR1@90" and "requeue" in options
    assert options["ntasks-per-node"] == options["gpus-per-node"]
    assert int(options["nodes"]) == (1 if template.startswith("single") else 2)
    text = (SLURM_DIR / template).read_text()
    assert "srun --kill-on-bad-exit=1 python -m robustft fit" in text
    assert '--trainer.num_nodes "$NODES"' in text and '--trainer.devices "$DEVICES"' in text
    assert 'RUN_DIR=${RUN_ROOT:-runs}/${SLURM_JOB_NAME}' in text and "--ckpt_path" not in text.split("srun")[1]
    subprocess.run(["bash", "-n", str(SLURM_DIR / template)], check=True)


def test_two_node_job_forms_one_process_group(tmp_path: Path) -> None:
    env = _slurm_env(tmp_path, job_id="31337", job_name="rft-two-nodes", nodes=2, tasks_per_node=1)
    record = tmp_path / "record"
    config = write_config(tmp_path / "job.yaml", tiny_config(
        tmp_path / "ignored", callbacks=[callback("rft_dist_utils.Recorder", path=str(record))],
        trainer={"max_steps": 2, "limit_val_batches": 0, "enable_checkpointing": False}, scores=("msp",),
    ))
    job = _sbatch("multi_node.sbatch", config, env)
    out, _ = job.communicate(timeout=240)
    assert job.returncode == 0, out[-8000:]
    starts = [next(r for r in read_jsonl(Path(f"{record}.rank{k}")) if r["event"] == "start") for k in range(2)]
    ends = [next(r for r in read_jsonl(Path(f"{record}.rank{k}")) if r["event"] == "end") for k in range(2)]
    assert [s["global_rank"] for s in starts] == [0, 1] and [s["node_rank"] for s in starts] == [0, 1]
    assert all(s["world_size"] == 2 and s["dist_world_size"] == 2 for s in starts)
    assert all(s["cluster_environment"] == "SLURMEnvironment" for s in starts)
    assert starts[0]["pid"] != starts[1]["pid"]
    assert [e["global_step"] for e in ends] == [2, 2]
    # each rank trained on its own half of every batch; DDP's gradient all-reduce kept the weights equal
    assert ends[0]["checksum"] == ends[1]["checksum"]
    assert (tmp_path / "runs" / "rft-two-nodes").is_dir()


def test_sigusr1_saves_hpc_checkpoint_requeues_and_the_requeued_job_resumes(tmp_path: Path) -> None:
    job_id, job_name = "4242", "rft-requeue"
    env = _slurm_env(tmp_path, job_id=job_id, job_name=job_name, nodes=1, tasks_per_node=1)
    record = tmp_path / "record"
    total_steps = 10
    config = write_config(tmp_path / "job.yaml", tiny_config(
        tmp_path / "ignored",
        callbacks=[callback("rft_dist_utils.Recorder", path=str(record)),
                   callback("rft_dist_utils.Throttle", seconds=0.4)],
        trainer={"max_epochs": 2, "limit_train_batches": total_steps // 2, "limit_val_batches": 1}, scores=("msp",),
    ))
    run_dir = tmp_path / "runs" / job_name
    job = _sbatch("single_node.sbatch", config, env)
    try:
        progress = Path(f"{record}.progress0")
        wait_for(lambda: progress.exists() and int(progress.read_text() or 0) >= 2, 180, "training to start", [job])
        start = next(r for r in read_jsonl(Path(f"{record}.rank0")) if r["event"] == "start")
        os.kill(start["pid"], signal.SIGUSR1)  # SLURM, 90 s before the time limit
        hpc = run_dir / "hpc_ckpt_1.ckpt"
        wait_for(lambda: hpc.exists() and (tmp_path / "scontrol.log").exists(), 60, "hpc checkpoint + requeue", [job])
        # scontrol requeue then ends the job; here the task is killed the hard way
        os.kill(start["pid"], signal.SIGKILL)
        job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", job_id]
    assert not [r for r in read_jsonl(Path(f"{record}.rank0")) if r["event"] == "end"]
    saved_step = torch.load(hpc, map_location="cpu", weights_only=False)["global_step"]
    assert 2 <= saved_step < total_steps

    requeued = _sbatch("single_node.sbatch", config, env)  # same job id, name and script
    out, _ = requeued.communicate(timeout=240)
    assert requeued.returncode == 0, out[-8000:]
    records = read_jsonl(Path(f"{record}.rank0"))
    starts = [r for r in records if r["event"] == "start"]
    assert len(starts) == 2 and starts[1]["global_step"] == saved_step
    assert Path(starts[1]["ckpt_path"]) == hpc
    assert [r["global_step"] for r in records if r["event"] == "end"] == [total_steps]


def test_slurm_trainer_config_sets_a_collective_timeout() -> None:
    """configs/trainer/slurm.yaml: DDP with a 10-minute collective timeout, parsed from YAML by the CLI."""
    out = subprocess.run(
        [sys.executable, "-m", "robustft", "fit", "--config", "configs/quickstart.yaml", "--config",
         "configs/trainer/slurm.yaml", "--print_config"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    strategy = yaml.safe_load(out)["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.DDPStrategy"
    assert strategy["init_args"]["timeout"] == "0:10:00"


def test_kill_on_bad_exit_ends_the_job_when_one_task_dies(tmp_path: Path) -> None:
    """Rank 1 exits with code 3 at step 1 while rank 0 stalls outside any collective for 120 s (it would
    not notice the dead peer before then): srun --kill-on-bad-exit=1 ends rank 0 too, within seconds."""
    env = _slurm_env(tmp_path, job_id="777", job_name="rft-bad-exit", nodes=2, tasks_per_node=1)
    marker = tmp_path / "marks.jsonl"
    record = tmp_path / "record"
    config = write_config(tmp_path / "job.yaml", tiny_config(
        tmp_path / "ignored",
        callbacks=[callback("rft_dist_utils.Recorder", path=str(record)),
                   callback("rft_dist_utils.DieOnRank", rank=1, step=1, code=3, stall=120, marker=str(marker))],
        trainer={"max_steps": 4, "limit_val_batches": 0, "enable_checkpointing": False}, scores=("msp",),
    ))
    job = subprocess.Popen(["bash", str(SLURM_DIR / "multi_node.sbatch"), str(config), "--trainer.accelerator", "cpu"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        out, _ = job.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        out, _ = job.communicate()
        raise AssertionError(f"the job did not end\n{out[-6000:]}") from None
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    ended = time.time()
    died = next(r["time"] for r in read_jsonl(marker) if r["what"] == "exit")
    print(f"SLURM task death: job exit {job.returncode} {ended - died:.1f}s after rank 1 exited")
    assert job.returncode == 3, out[-6000:]  # srun (and the job script) exit with the failing task's code
    assert ended - died < 30, out[-6000:]
    assert "--kill-on-bad-exit: terminating the other tasks" in out
    starts = [next(r for r in read_jsonl(Path(f"{record}.rank{k}")) if r["event"] == "start") for k in range(2)]
    assert all(s["dist_world_size"] == 2 and s["cluster_environment"] == "SLURMEnvironment" for s in starts)
    for k in range(2):
        assert not [r for r in read_jsonl(Path(f"{record}.rank{k}")) if r["event"] == "end"]
