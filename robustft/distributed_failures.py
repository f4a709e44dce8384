"""Rank-local failures that stop every rank together, with the failing rank's own message.

Under DDP a check that fails on ONE rank (a NaN loss on one shard, a bad batch) must not simply raise
there: the other ranks would go on to the next collective (the gradient all-reduce) and wait for a peer
that is gone -- until the collective timeout on NCCL. :func:`raise_on_any_rank` instead makes every rank
agree on "did any rank fail?" (one tiny all-reduce), and then every rank raises: the failing rank its own
message, the others a message saying which rank failed, followed by that rank's message (gathered only
on the failure path), so whichever process's error the launcher prints names the real cause.
"""

from __future__ import annotations

from typing import Any

import torch


def _world(trainer: Any) -> tuple[int, int]:
    """(global rank, world size) of a Lightning trainer, (0, 1) without one."""
    if trainer is None:
        return 0, 1
    return int(getattr(trainer, "global_rank", 0)), int(getattr(trainer, "world_size", 1))


def raise_on_any_rank(trainer: Any, message: str | None, error: type[BaseException]) -> None:
    """Raise ``error`` on EVERY rank when ``message`` is not ``None`` on ANY rank; return otherwise.

    All ranks must call this at the same point (same step, same number of calls), like any collective.
    With one process (or no trainer) it is a plain ``if message: raise error(message)``: no collective.
    With several, it costs one all-reduce of a single integer per call (Lightning's
    ``strategy.reduce_boolean_decision``); the messages are gathered only when some rank failed.
    """
    rank, world_size = _world(trainer)
    if world_size <= 1:
        if message is not None:
            raise error(message)
        return
    # one tiny all-reduce per call: the price of never leaving a peer waiting in the next collective
    if not trainer.strategy.reduce_boolean_decision(message is not None, all=False):
        return
    failed = _gather_messages(message, world_size)  # every rank takes part, the failing ones included
    if message is not None:
        raise error(f"{message} [rank {rank} of {world_size}]")
    first = next(((k, m) for k, m in enumerate(failed) if m is not None), None)
    if first is None:  # cannot happen when the reduction said some rank failed; say so rather than guess
        raise error(f"another rank (of {world_size}) reported a failure; see its message above")
    k, text = first
    raise error(f"rank {k} of {world_size} reported: {text} (this is rank {rank}, stopping with it)")


def _gather_messages(message: str | None, world_size: int) -> list[str | None]:
    """Every rank's message (``None`` where it did not fail); called on the failure path only."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [None] * world_size
    gathered: list[str | None] = [None] * world_size
    try:
        torch.distributed.all_gather_object(gathered, message)
    except Exception:  # a peer already gone: the failing rank's own error still reaches the user
        return [None] * world_size
    return gathered
