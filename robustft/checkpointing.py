"""Checkpoint files: atomic writes, and reading what a file given as ``--ckpt_path`` is.

A save killed half-way never leaves a truncated ``last.ckpt``.

Lightning's default ``TorchCheckpointIO`` writes straight into the target file. Here the checkpoint is
written to a temporary file in the same directory, flushed to disk, and renamed over the target with
``os.replace`` (atomic on POSIX and Windows).
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from robustft.io import atomic_torch_save

#: the entry robustft adds to every checkpoint it writes (method class path, number of classes)
CHECKPOINT_KEY = "robustft"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with write-to-temp-then-rename semantics for local paths."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        target = Path(path)
        if "://" in str(path):  # remote filesystems: defer to Lightning's fsspec writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, target)


class CheckpointFileError(ValueError):
    """``--ckpt_path`` does not point at a checkpoint robustft can resume or evaluate."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a robustft checkpoint says about itself, read without building the model."""

    path: Path
    method: str
    epoch: int | None
    global_step: int | None
    num_classes: int | None


def inspect_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Read ``path`` and say what it is, or raise :class:`CheckpointFileError` naming the file and the fix.

    Plain weights (a bare state dict, or an akamaster ``.th`` file) are answered with
    ``backbone_weights``; truncated or random files with "not a checkpoint"; a Lightning checkpoint of
    another framework with "not written by robustft". Lightning's own errors for these cases
    (``KeyError: 'pytorch-lightning_version'``, ``UnpicklingError``) name neither the file nor the fix.
    """
    file = Path(path)
    flag = f"--ckpt_path '{file}'"
    if not file.is_file():
        raise CheckpointFileError(f"{flag}: no such file; give a checkpoint written by fit (e.g. <run>/checkpoints/last.ckpt)")
    stat = file.stat()
    return _inspect(file, str(file.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _inspect(file: Path, resolved: str, mtime_ns: int, size: int) -> CheckpointInfo:
    """:func:`inspect_checkpoint` of one version of a file (the CLI asks several times per command: a
    checkpoint of a ViT-B is a gigabyte, so it is read once, and memory-mapped rather than loaded)."""
    flag = f"--ckpt_path '{file}'"
    try:
        try:
            checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception:  # truncated zip, random bytes, a pickle of arbitrary objects, ...
        with open(file, "rb") as handle:
            is_zip = handle.read(4) == b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
        what = "a damaged or truncated PyTorch file" if is_zip else "not a PyTorch checkpoint file"
        raise CheckpointFileError(
            f"{flag}: {what}, cannot be read. Give a checkpoint written by fit (e.g. <run>/checkpoints/last.ckpt); "
            "if a save was interrupted, the previous complete checkpoint is still in that folder"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointFileError(f"{flag}: holds a {type(checkpoint).__name__}, not a checkpoint written by fit")
    if "pytorch-lightning_version" not in checkpoint:
        raise CheckpointFileError(
            f"{flag}: holds plain weights (a state dict), not a checkpoint written by fit. To start from these "
            f"weights set model.init_args.backbone_weights: {file} and drop --ckpt_path"
        )
    info = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(info, dict) or "method" not in info:
        raise CheckpointFileError(
            f"{flag}: a Lightning checkpoint not written by robustft (no '{CHECKPOINT_KEY}' entry). To use its "
            "weights, export the backbone's state dict and set model.init_args.backbone_weights"
        )
    return CheckpointInfo(
        path=file,
        method=str(info["method"]),
        epoch=checkpoint.get("epoch"),
        global_step=checkpoint.get("global_step"),
        num_classes=info.get("num_classes"),
    )


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (recorded in reports: which checkpoint was evaluated)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
