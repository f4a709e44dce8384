"""Training state that methods share and that must survive a resume exactly.

Three building blocks, all ``nn.Module`` s whose state lives in registered buffers (or parameters), so
that placed as attributes of a LightningModule they are part of its ``state_dict``, are saved in every
checkpoint and are restored bit-exactly by ``--ckpt_path``:

* :class:`EMAModule`: an exponential moving average copy of a module (MoCo/LOOK momentum key encoder,
  mean teacher). ``ema <- m * ema + (1 - m) * source`` under ``no_grad``; the copy never requires grad.
* :class:`LabeledQueue`: a fixed-capacity FIFO memory of ``(key [D], label, sample id)`` (MoCo/LOOK
  memory) that wraps around correctly when a batch crosses the end, knows how many slots are filled,
  and by default gathers each batch across ranks so that every rank holds the same queue.
* Cross-rank helpers for buffers and prototypes (PALM): :func:`all_gather_cat` (first dimensions may
  differ between ranks), :func:`all_reduce_sum_`, :func:`all_reduce_mean_`, :func:`broadcast_` and
  :func:`sync_buffers`. Each is the identity when ``torch.distributed`` is not initialised, so the same
  code runs in one process and under DDP.

State that depends on the global batch (a queue, prototypes updated from batch statistics) must be
computed from gathered data, never from the local shard: then all ranks compute the same update and the
result equals one process on the whole batch. :func:`sync_buffers` is the fallback that makes buffers
identical after the fact (average, or rank 0's copy).

Under DDP, buffers of the wrapped module are broadcast from rank 0 before each forward when
``broadcast_buffers=True`` (PyTorch's default). That keeps them consistent but costs bandwidth for a
large queue that is already identical on every rank; ``DDPStrategy(broadcast_buffers=False)`` avoids it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from robustft.evaluation.distributed import _all_gather_uneven, world

__all__ = [
    "EMAModule",
    "LabeledQueue",
    "QueueEntries",
    "all_gather_cat",
    "all_reduce_mean_",
    "all_reduce_sum_",
    "broadcast_",
    "is_distributed",
    "sync_buffers",
]

BufferMode = Literal["copy", "ema", "own"]


# ---------------------------------------------------------------------------------------------------
# cross-rank helpers


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return world()[1] > 1


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dimension 0, in rank order.

    The first dimension may differ between ranks (a last, smaller batch; an empty shard); the other
    dimensions, the dtype and the device must agree. Every rank gets the same result. No gradient flows
    back (the result is detached; use ``LightningModule.all_gather(..., sync_grads=True)`` for a
    differentiable gather). Returns ``tensor`` itself, detached, outside distributed runs. Under NCCL
    the tensor must be on the rank's GPU.
    """
    if tensor.ndim == 0:
        raise ValueError("all_gather_cat needs a tensor with a first (batch) dimension, got a 0-d tensor")
    tensor = tensor.detach()
    if not is_distributed():
        return tensor
    return torch.cat(_all_gather_uneven(tensor.contiguous()))


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """In place: ``tensor`` becomes the sum over ranks (identical on all). Returns ``tensor``."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensor: Tensor) -> Tensor:
    """In place: ``tensor`` becomes the mean over ranks (identical on all). Returns ``tensor``.

    Floating tensors only (an integer mean would have to round). To average a statistic over samples
    when ranks hold different numbers of samples, all-reduce the sums and the counts with
    :func:`all_reduce_sum_` and divide, or gather with :func:`all_gather_cat`: a mean of per-rank means
    weighs a small shard as much as a large one.
    """
    if not tensor.is_floating_point():
        raise TypeError(f"all_reduce_mean_ needs a floating tensor, got {tensor.dtype}")
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world()[1])
    return tensor


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """In place: every rank receives rank ``src``'s ``tensor``. Returns ``tensor``."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def sync_buffers(
    module: nn.Module,
    names: Iterable[str] | None = None,
    *,
    mode: Literal["mean", "broadcast"] = "mean",
    src: int = 0,
) -> nn.Module:
    """Make buffers of ``module`` identical on every rank, in place; returns ``module``.

    ``names``: buffer names as in ``module.named_buffers()`` (e.g. ``"prototypes"``,
    ``"queue.keys"``); default every buffer. An unknown name raises ``KeyError`` (also in one process).
    ``mode="mean"``: floating buffers become their average over ranks; non-floating buffers (counters,
    pointers) take rank ``src``'s value, since an average of them means nothing. ``mode="broadcast"``:
    every buffer takes rank ``src``'s value. A no-op outside distributed runs.
    """
    if mode not in ("mean", "broadcast"):
        raise ValueError(f"sync_buffers mode must be 'mean' or 'broadcast', got {mode!r}")
    buffers = dict(module.named_buffers())
    if names is None:
        selected = list(buffers.items())
    else:
        names = list(names)
        unknown = [n for n in names if n not in buffers]
        if unknown:
            raise KeyError(
                f"sync_buffers: no buffer(s) {unknown} in {type(module).__name__}; it has {sorted(buffers)}"
            )
        selected = [(n, buffers[n]) for n in names]
    if not is_distributed():
        return module
    for _, buffer in selected:
        if mode == "mean" and buffer.is_floating_point():
            all_reduce_mean_(buffer)
        else:
            broadcast_(buffer, src=src)
    return module


# ---------------------------------------------------------------------------------------------------
# EMA of a module


class EMAModule(nn.Module):
    """An exponential-moving-average copy of a module (momentum encoder).

    ``EMAModule(source, momentum=m)`` deep-copies ``source``; every :meth:`update` then sets, for each
    parameter, ``ema = m * ema + (1 - m) * source`` (MoCo's ``θ_k ← m θ_k + (1 − m) θ_q``; ``m = 1``
    freezes the copy, ``m = 0`` copies the source). The copy's parameters have ``requires_grad=False``,
    so optimizers built from ``requires_grad`` parameters skip them, and :meth:`update` runs under
    ``no_grad``. Calling the module runs the copy (``ema(x)``); wrap it in ``torch.no_grad()`` when its
    output must not be differentiated through the inputs.

    Buffers (BatchNorm running statistics and ``num_batches_tracked``), ``buffers=``:

    * ``"copy"`` (default): copied from the source at every update, so the copy's normalisation
      statistics follow the source exactly (timm ``ModelEmaV3`` without buffer EMA);
    * ``"ema"``: floating buffers are averaged like parameters, integer buffers copied (timm
      ``ModelEmaV2``, which averages the whole ``state_dict``);
    * ``"own"``: left alone; the copy's own forwards in training mode update them (MoCo's key encoder).

    The copy starts in the source's train/eval mode and follows ``.train()`` / ``.eval()`` of its parent.
    The state (``module.*`` and ``num_updates``) is in the ``state_dict`` and restored exactly;
    ``num_updates`` counts updates, for momentum schedules (pass ``momentum=`` to :meth:`update`).
    """

    num_updates: Tensor

    def __init__(self, source: nn.Module, momentum: float = 0.999, buffers: BufferMode = "copy") -> None:
        super().__init__()
        _check_momentum(momentum)
        if buffers not in ("copy", "ema", "own"):
            raise ValueError(f"EMAModule buffers must be 'copy', 'ema' or 'own', got {buffers!r}")
        self.momentum = float(momentum)
        self.buffer_mode: BufferMode = buffers
        self.module = copy.deepcopy(source)
        for param in self.module.parameters():
            param.requires_grad_(False)
            param.grad = None
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, source: nn.Module, momentum: float | None = None) -> None:
        """One EMA step towards ``source`` (the module this copy was made from, same structure)."""
        m = self.momentum if momentum is None else float(momentum)
        _check_momentum(m)
        ema_params = dict(self.module.named_parameters())
        src_params = dict(source.named_parameters())
        _check_same_names("parameters", ema_params, src_params)
        ema_list = [ema_params[n] for n in ema_params]
        src_list = [src_params[n].detach().to(ema_params[n].dtype) for n in ema_params]
        _ema_(ema_list, src_list, m)
        if self.buffer_mode != "own":
            ema_buffers = dict(self.module.named_buffers())
            src_buffers = dict(source.named_buffers())
            _check_same_names("buffers", ema_buffers, src_buffers)
            averaged: list[tuple[Tensor, Tensor]] = []
            for name, buffer in ema_buffers.items():
                value = src_buffers[name].detach()
                if self.buffer_mode == "ema" and buffer.is_floating_point():
                    averaged.append((buffer, value.to(buffer.dtype)))
                else:
                    buffer.copy_(value)
            if averaged:
                _ema_([b for b, _ in averaged], [v for _, v in averaged], m)
        self.num_updates += 1

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, buffers={self.buffer_mode!r}"


def _check_momentum(momentum: float) -> None:
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")


def _check_same_names(what: str, ema: dict[str, Tensor], src: dict[str, Tensor]) -> None:
    if ema.keys() != src.keys():
        missing, extra = sorted(ema.keys() - src.keys()), sorted(src.keys() - ema.keys())
        raise ValueError(
            f"EMAModule.update: the source's {what} differ from the copy's (missing in source: {missing}, "
            f"not in the copy: {extra}); pass the module the EMA was built from"
        )


def _ema_(targets: list[Tensor], sources: list[Tensor], m: float) -> None:
    """``t = m * t + (1 - m) * s`` for each pair, in place: two roundings, ``fl(fl(m t) + fl((1 - m) s))``."""
    if not targets:
        return
    torch._foreach_mul_(targets, m)
    torch._foreach_add_(targets, torch._foreach_mul(sources, 1.0 - m))


# ---------------------------------------------------------------------------------------------------
# labelled FIFO queue


class QueueEntries(NamedTuple):
    """The filled part of a :class:`LabeledQueue`: ``keys`` [n, D], ``labels`` [n], ``ids`` [n]."""

    keys: Tensor
    labels: Tensor
    ids: Tensor


class LabeledQueue(nn.Module):
    """A FIFO memory of ``capacity`` entries ``(key [dim], label, sample id)`` in registered buffers.

    :meth:`enqueue` writes a batch at the pointer, wrapping around the end (a batch that crosses the
    end fills the last slots and continues at slot 0, overwriting the oldest entries); a batch longer
    than the capacity keeps only its last ``capacity`` entries. ``num_filled`` counts the valid slots:
    until the queue is full they are slots ``0 .. num_filled - 1``, and :meth:`entries` /
    :meth:`valid_mask` never return an unfilled slot. Keys are stored detached, in ``dtype``.

    By default :meth:`enqueue` all-gathers the batch across ranks first (rank order, uneven batch sizes
    allowed), so every rank holds the same queue and it equals the queue one process would build from
    the global batch. Pass ``gather=False`` when the batch is already gathered.

    State (``keys``, ``labels``, ``ids``, ``ptr``, ``num_filled``) is in the ``state_dict`` and restored
    exactly, pointer included. Empty slots hold label and id ``-1``.
    """

    keys: Tensor
    labels: Tensor
    ids: Tensor
    ptr: Tensor
    num_filled: Tensor

    def __init__(self, capacity: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if int(capacity) < 1:
            raise ValueError(f"LabeledQueue capacity must be >= 1, got {capacity}")
        if int(dim) < 1:
            raise ValueError(f"LabeledQueue dim must be >= 1, got {dim}")
        self.capacity = int(capacity)
        self.dim = int(dim)
        self.register_buffer("keys", torch.zeros(self.capacity, self.dim, dtype=dtype))
        self.register_buffer("labels", torch.full((self.capacity,), -1, dtype=torch.long))
        self.register_buffer("ids", torch.full((self.capacity,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.num_filled)

    @property
    def is_full(self) -> bool:
        return int(self.num_filled) == self.capacity

    @torch.no_grad()
    def enqueue(
        self, keys: Tensor, labels: Tensor | None = None, ids: Tensor | None = None, *, gather: bool = True
    ) -> None:
        """Append a batch: ``keys`` [B, dim], ``labels`` [B] and ``ids`` [B] (``None``: ``-1``)."""
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"LabeledQueue keys must be [B, {self.dim}], got shape {tuple(keys.shape)}")
        batch = keys.shape[0]
        device = self.keys.device
        labels = _column(labels, batch, "labels", keys.device)
        ids = _column(ids, batch, "ids", keys.device)
        keys = keys.detach()
        if gather:
            keys, labels, ids = all_gather_cat(keys), all_gather_cat(labels), all_gather_cat(ids)
        n = keys.shape[0]
        if n == 0:
            return
        skip = max(0, n - self.capacity)  # a batch longer than the queue keeps its newest entries
        keys, labels, ids = keys[skip:], labels[skip:], ids[skip:]
        pos = (self.ptr + skip + torch.arange(n - skip, device=device)) % self.capacity
        self.keys.index_copy_(0, pos, keys.to(device=device, dtype=self.keys.dtype))
        self.labels.index_copy_(0, pos, labels.to(device))
        self.ids.index_copy_(0, pos, ids.to(device))
        self.ptr.copy_((self.ptr + n) % self.capacity)
        self.num_filled.copy_(torch.clamp(self.num_filled + n, max=self.capacity))

    def valid_mask(self) -> Tensor:
        """``[capacity]`` bool: which slots hold an entry (for fixed-shape, vectorised losses)."""
        return torch.arange(self.capacity, device=self.keys.device) < self.num_filled

    def entries(self, chronological: bool = False) -> QueueEntries:
        """The filled entries, in slot order, or oldest to newest with ``chronological=True``."""
        n = int(self.num_filled)
        if chronological and n == self.capacity:
            order = (self.ptr + torch.arange(n, device=self.keys.device)) % self.capacity
            return QueueEntries(self.keys[order], self.labels[order], self.ids[order])
        return QueueEntries(self.keys[:n], self.labels[:n], self.ids[:n])

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue (slots back to zeros / -1, pointer and count to 0)."""
        self.keys.zero_()
        self.labels.fill_(-1)
        self.ids.fill_(-1)
        self.ptr.zero_()
        self.num_filled.zero_()

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, dim={self.dim}, dtype={self.keys.dtype}"


def _column(values: Tensor | None, batch: int, name: str, device: torch.device) -> Tensor:
    if values is None:
        return torch.full((batch,), -1, dtype=torch.long, device=device)
    values = torch.as_tensor(values, device=device).detach()
    if values.shape != (batch,):
        raise ValueError(
            f"LabeledQueue {name} must be [{batch}] like the keys, got shape {tuple(values.shape)}"
        )
    if values.is_floating_point() or values.is_complex():
        raise TypeError(f"LabeledQueue {name} must be integers, got {values.dtype}")
    return values.long()
