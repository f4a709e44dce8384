"""Where a callback writes its files, resolved the same way on every rank.

``trainer.log_dir`` is a collective: it broadcasts rank 0's folder to every process. A callback that
reads it on rank 0 only (to write a report, say) leaves the other ranks waiting in their next
collective, and the run deadlocks. Callbacks therefore resolve their folder once, on every rank, in
``setup``, and keep the plain path.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl


def resolve_output_dir(trainer: pl.Trainer, configured: str | None, subfolder: str) -> Path:
    """``configured`` if given, else ``<trainer.log_dir or default_root_dir>/<subfolder>``.

    Call it on every rank at the same point of the run (it may broadcast)."""
    if configured is not None:
        return Path(configured)
    return Path(trainer.log_dir or trainer.default_root_dir) / subfolder
