"""SLURM on localhost: the sbatch templates run under a fake ``srun`` (one process per task with the
variables srun sets) and a fake ``scontrol`` (records its arguments).

- 2 "nodes" x 1 task form one gloo process group through Lightning's SLURMEnvironment and train in sync.
- SIGUSR1 (what ``#SBATCH --signal=SIGUSR1@90`` sends) makes Lightning save ``hpc_ckpt_1.ckpt`` in the
  stable ``runs/<job name>`` and call ``scontrol requeue <job id>``; the requeued job (same script, same
  variables) resumes from that checkpoint's global step. The signal part uses a 1-task job: on a 2-core
  CI machine two ranks receiving the signal at different points of a step make the hpc save (which has a
  barrier) flaky, so the 2-task job covers process-group formation and synchronised training only.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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

FAKE_SRUN = """#!/bin/sh
# fake srun: start SLURM_NTASKS copies of the command here, with the variables srun gives each task
n=${SLURM_NTASKS:-1}; per=${SLURM_NTASKS_PER_NODE:-1}; i=0; pids=""
while [ "$i" -lt "$n" ]; do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % per)) SLURM_NODEID=$((i / per)) "$@" &
  pids="$pids $!"; i=$((i + 1))
done
rc=0; for p in $pids; do wait "$p" || rc=$?; done; exit $rc
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
    assert "srun python -m robustft fit" in text
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
