"""Atomic checkpoint writes: a save killed half-way never leaves a truncated ``last.ckpt``.

Lightning's default ``TorchCheckpointIO`` writes straight into the target file. Here the checkpoint is
written to a temporary file in the same directory, flushed to disk, and renamed over the target with
``os.replace`` (atomic on POSIX and Windows).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from robustft.io import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with write-to-temp-then-rename semantics for local paths."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        target = Path(path)
        if "://" in str(path):  # remote filesystems: defer to Lightning's fsspec writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, target)
