"""Helpers of the multi-process tests: tiny configs, a subprocess runner, and two callbacks that the
subprocesses load from YAML (this folder is put on their ``PYTHONPATH``).

Every run uses the real CLI (``python -m robustft ...``) on the bundled real data, small enough for a
2-core CI machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment of a CLI subprocess: one thread per process (2 cores), this folder importable,
    and no SLURM / torchrun variables inherited from the machine running the tests."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "PL_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_", "RANK", "GROUP_RANK"))
    }
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "robustft", *args]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python -m robustft <args>`` from the repository root; fail with its output if it fails.

    The run gets its own process group, and a run past ``timeout`` is killed with every process it
    started (DDP ranks included): a deadlock fails the test instead of hanging the suite."""
    proc = subprocess.Popen(
        cli_command(*args), cwd=REPO, env=env or subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"`robustft {' '.join(args)}` did not finish within {timeout}s (deadlock?); killed its process group\n"
            f"--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-6000:]}"
        ) from None
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if result.returncode != 0:
        raise AssertionError(
            f"`robustft {' '.join(args)}` exited with {result.returncode}\n--- stdout ---\n{result.stdout[-6000:]}"
            f"\n--- stderr ---\n{result.stderr[-8000:]}"
        )
    return result


def wait_for(predicate, timeout: float, what: str, procs: list[subprocess.Popen] | None = None, poll: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value; fail early if a watched process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for proc in procs or []:
            if proc.poll() is not None and proc.returncode != 0:
                out = proc.stdout.read() if proc.stdout else ""
                raise AssertionError(f"process exited with {proc.returncode} while waiting for {what}\n{out[-8000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def tiny_config(
    out: Path,
    *,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    callbacks: list[dict] | None = None,
    trainer: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    scores: tuple[str, ...] = ("msp", "energy", "knn"),
) -> dict:
    """A complete CLI config: real ResNet-20 weights, small real ID/OOD subsets with uneven sizes."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "num_nodes": num_nodes,
            "strategy": strategy,
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "deterministic": True,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(out),
            "callbacks": callbacks or [],
            **(trainer or {}),
        },
        "model": {
            "class_path": "robustft.methods.Classifier",
            "init_args": {
                "num_classes": 10,
                "backbone": "cifar_resnet20",
                "backbone_weights": "data/weights/resnet20-12fca82f.th",
                "scores": list(scores),
                "optimizer": {
                    "class_path": "torch.optim.SGD",
                    "init_args": {"lr": 0.01, "momentum": 0.9, "weight_decay": 5.0e-4},
                },
            },
        },
        "data": {
            "class_path": "robustft.data.OODDataModule",
            "init_args": {
                "train": {"source": "npz", "path": "data/cifar10/cifar10_train_5k_jpeg.npz", "max_samples": 160},
                "test": {"source": "npz", "path": "data/cifar10/cifar10_test_2k.npz", "max_samples": 101},
                "ood": {
                    "near": {"tin": {"source": "npz", "path": "data/tinyimagenet/tin_test_32.npz", "max_samples": 61}},
                    "far": {
                        "mnist": {"source": "mnist", "path": "data/mnist", "max_samples": 41},
                        "dtd": {"source": "npz", "path": "data/dtd/dtd_10class_32.npz", "max_samples": 33},
                    },
                },
                "batch_size": 16,
                "eval_batch_size": 32,
                **(data or {}),
            },
        },
    }
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def callback(class_path: str, **init_args: Any) -> dict:
    return {"class_path": class_path, "init_args": init_args}


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------- callbacks used by subprocesses


class Throttle(pl.Callback):
    """Sleep after every training batch, so a test can signal or kill a run while it trains."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        time.sleep(self.seconds)


class Recorder(pl.Callback):
    """Append JSON lines to ``<path>.rank<k>``: the process group and global step at train start, the
    step after each batch (``progress`` file), and a parameter checksum at train end."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, trainer: pl.Trainer, record: dict) -> None:
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._write(trainer, {
            "event": "start",
            "pid": os.getpid(),
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "dist_world_size": torch.distributed.get_world_size() if initialized else 1,
            "cluster_environment": type(trainer._accelerator_connector.cluster_environment).__name__,
            "ckpt_path": trainer.ckpt_path,
        })

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        Path(f"{self.path}.progress{trainer.global_rank}").write_text(str(trainer.global_step))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        checksum = float(sum(p.detach().double().sum() for p in pl_module.parameters()))
        self._write(trainer, {"event": "end", "global_step": trainer.global_step, "checksum": checksum})


# ------------------------------------------------------------------- worker of the gloo unit test


def gather_worker(rank: int, world_size: int, port: int, sizes: list[int], out_dir: str) -> None:
    """One rank: ShardSampler shards of every size in ``sizes``, gathered back with gather_by_index."""
    import torch.distributed as dist

    from robustft.evaluation.distributed import ShardSampler, gather_by_index

    torch.set_num_threads(1)  # forked child: never enter an OpenMP region the parent initialised
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results = {}
        for size in sizes:
            local = list(ShardSampler(size))
            index = torch.tensor(local, dtype=torch.long)
            outputs = {"index": index, "value": index.double() * 10 + rank / 1000, "logits": torch.randn(len(local), 3)}
            gathered = gather_by_index(outputs)
            results[size] = {
                "local": local,
                "len": len(ShardSampler(size)),
                "gathered_index": gathered["index"].tolist(),
                "gathered_rank": [round((v % 1) * 1000) for v in gathered["value"].tolist()],
                "logits_shape": list(gathered["logits"].shape),
            }
        # a duplicated index must be refused, not averaged into a metric
        try:
            gather_by_index({"index": torch.tensor([0]), "value": torch.tensor([1.0])})
            results["duplicate_refused"] = False
        except RuntimeError:
            results["duplicate_refused"] = True
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------- faults injected by the fault-tolerance tests


def _mark(path: str | None, rank: int, what: str) -> None:
    """Append ``{"what", "rank", "time"}`` to ``path`` (wall clock: the test compares it with its own)."""
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"what": what, "rank": rank, "time": time.time()}) + "\n")


class NaNOnRank(pl.Callback):
    """Fill the images of ONE rank's batch at global step ``step`` with NaN: a bad batch on one shard, so
    the loss is non-finite on that rank only."""

    def __init__(self, rank: int = 1, step: int = 2, marker: str | None = None) -> None:
        self.rank, self.step, self.marker = rank, step, marker

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch["image"].fill_(float("nan"))
            _mark(self.marker, trainer.global_rank, "nan")


class FileSizeLimit(pl.Callback):
    """``ulimit -f`` applied mid-run: after global step ``after_step`` no file this process writes may grow
    past ``max_bytes`` (a disk that fills up during training). SIGXFSZ is ignored, so a write past the limit
    fails with ``OSError(EFBIG)`` instead of killing the process."""

    def __init__(self, after_step: int, max_bytes: int, marker: str | None = None) -> None:
        self.after_step, self.max_bytes, self.marker = after_step, max_bytes, marker
        self.applied = False

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self.applied and trainer.global_step >= self.after_step:
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            self.applied = True
            _mark(self.marker, trainer.global_rank, "disk full")


class DieOnRank(pl.Callback):
    """At global step ``step``: rank ``rank`` exits at once with ``code`` (a crash, an OOM kill), and every
    other rank stalls for ``stall`` seconds outside any collective (it would not notice the dead peer)."""

    def __init__(self, rank: int = 1, step: int = 1, code: int = 3, stall: float = 120.0,
                 marker: str | None = None) -> None:
        self.rank, self.step, self.code, self.stall, self.marker = rank, step, code, stall, marker

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        if trainer.global_rank == self.rank:
            _mark(self.marker, trainer.global_rank, "exit")
            os._exit(self.code)
        time.sleep(self.stall)


# ------------------------------------------------------------------- kill-and-resume runs


def load_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint with everything in it (loop and datamodule state included)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def start_fit(config: Path, env: dict[str, str], capture: bool = True) -> subprocess.Popen:
    """``python -m robustft fit --config <config>`` in the background (output captured or discarded)."""
    return subprocess.Popen(cli_command("fit", "--config", str(config)), cwd=REPO, env=env,
                            stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            text=True)


def fit_and_sigkill_after_first_checkpoint(config: Path, last: Path, env: dict[str, str]) -> None:
    """Run ``fit`` of ``config`` (which should throttle its steps) and SIGKILL it as soon as ``last`` exists,
    i.e. mid-run; asserts the process died of the signal."""
    killed = start_fit(config, env, capture=False)
    try:
        wait_for(last.exists, timeout=180, what="the first checkpoint of the run to kill", procs=[killed])
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert killed.returncode == -signal.SIGKILL
