"""Optimizers and learning-rate schedules: chosen in YAML, built in one place for every method.

A method takes ``optimizer`` (Lightning's ``OptimizerCallable``) and ``scheduler``
(``LRSchedulerCallable | None``) arguments. In a config either is a ``class_path`` / ``init_args`` block
naming any ``torch.optim`` class (or any other optimizer / scheduler class); the first constructor
argument (the parameters, or the optimizer) is injected by :meth:`OODMethod.configure_optimizers
<robustft.methods.base.OODMethod.configure_optimizers>`::

    model:
      init_args:
        optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.01, momentum: 0.9, weight_decay: 5.0e-4}}
        scheduler: {class_path: robustft.optim.WarmupCosine, init_args: {warmup_steps: 0}}

In Python the same ``{"class_path", "init_args"}`` dict, a class, or any callable
(``functools.partial(torch.optim.AdamW, lr=1e-3)``) is accepted. The defaults are plain dicts (the
constants below), so a method built in Python gets exactly the optimizer the CLI would build, and its
hyper-parameters stay serialisable in checkpoints.

A scheduler with a ``total_steps`` attribute left at ``None`` (as :class:`WarmupCosine` by default) is given
``trainer.estimated_stepping_batches`` once the trainer is set up; its ``interval`` attribute (``"step"``
or ``"epoch"``, default ``"epoch"``, Lightning's) says how often it steps.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "ADAMW_CLIP",
    "SGD_CIFAR",
    "WARMUP_COSINE",
    "WarmupCosine",
    "build_optimizer",
    "build_scheduler",
    "callable_spec",
    "resolve_callable",
]

#: SGD of the CIFAR recipe (Nesterov off): the default of ``Classifier`` / ``Finetune``
SGD_CIFAR: dict[str, Any] = {
    "class_path": "torch.optim.SGD",
    "init_args": {"lr": 0.01, "momentum": 0.9, "weight_decay": 5.0e-4},
}
#: AdamW of the official CMA / FLYP code (lr 1e-5, weight decay 0.1 on everything): CLIP fine-tuning default
ADAMW_CLIP: dict[str, Any] = {
    "class_path": "torch.optim.AdamW",
    "init_args": {"lr": 1.0e-5, "weight_decay": 0.1},
}
#: per-step linear warm-up then cosine decay to 0 over the whole run: every method's default schedule
WARMUP_COSINE: dict[str, Any] = {"class_path": "robustft.optim.WarmupCosine", "init_args": {"warmup_steps": 0}}


class WarmupCosine(LRScheduler):
    """Per-step schedule: linear warm-up from ``lr/warmup_steps`` to ``lr`` over ``warmup_steps`` steps,
    then cosine decay to 0 at ``total_steps`` (constant 0 after it).

    The factor applied to each group's initial learning rate at step ``t`` (0-based) is
    ``(t + 1) / warmup_steps`` for ``t < warmup_steps``, else
    ``½ (1 + cos(π · min(1, (t - warmup_steps) / max(1, total_steps - warmup_steps))))``.

    Args:
        optimizer: the optimizer (injected).
        warmup_steps: steps of linear warm-up (0: none).
        total_steps: steps of the whole run; ``None`` lets the method fill in
            ``trainer.estimated_stepping_batches`` (until then the cosine part stays at its start, 1).
        cosine: ``False`` keeps the learning rate constant after the warm-up.
        last_epoch: index of the last step (``-1``: a fresh schedule), as torch's schedulers.
    """

    #: Lightning steps it after every optimizer step
    interval = "step"

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        cosine: bool = True,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"model.scheduler.init_args.warmup_steps must be >= 0, got {warmup_steps}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"model.scheduler.init_args.total_steps must be >= 1, got {total_steps}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.cosine = bool(cosine)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """Multiplier of the initial learning rate at (0-based) step ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.cosine or self.total_steps is None:
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def get_lr(self) -> list[float]:
        factor = self.factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]


# ---------------------------------------------------------------------------------- specs and callables
def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"'{path}' is not an import path (module.Class)")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import '{path}': {exc}") from None


def resolve_callable(value: Any, where: str) -> Callable[..., Any]:
    """A ``{"class_path", "init_args"}`` dict (or a class, or a callable) as a callable whose first
    positional argument is injected: ``resolve_callable(SGD_CIFAR, "model.optimizer")(params)``."""
    if isinstance(value, Mapping):
        if "class_path" not in value:
            raise ValueError(f"{where}: a dict needs 'class_path' (and optionally 'init_args'), got {dict(value)}")
        try:
            cls = _import(str(value["class_path"]))
        except ValueError as exc:
            raise ValueError(f"{where}.class_path: {exc}") from None
        init_args = dict(value.get("init_args") or {})
        return functools.partial(cls, **init_args)
    if isinstance(value, str):
        return resolve_callable({"class_path": value}, where)
    if callable(value):
        return value
    raise TypeError(f"{where} must be a class_path/init_args dict or a callable, got {type(value).__name__}")


def callable_spec(value: Any) -> dict[str, Any] | None:
    """The ``{"class_path", "init_args"}`` dict of an optimizer / scheduler argument, for checkpoints
    (which must hold plain data); ``None`` when the callable is not a class with keyword arguments
    (a lambda, a function). Understands classes, ``functools.partial(cls, **kw)`` and the partials
    jsonargparse builds for ``OptimizerCallable`` arguments."""
    if value is None or isinstance(value, Mapping):
        return None if value is None else copy.deepcopy(dict(value))
    if inspect.isclass(value):
        return {"class_path": f"{value.__module__}.{value.__qualname__}", "init_args": {}}
    if isinstance(value, functools.partial):
        classes = [a for a in (value.func, *value.args) if inspect.isclass(a)]
        if len(classes) == 1:
            cls = classes[0]
            return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(value.keywords)}
    return None


# ---------------------------------------------------------------------------------- plain helpers
def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
    optimizer: Any = SGD_CIFAR,
) -> Optimizer:
    """Build ``optimizer`` (a spec dict, class or callable) over ``params`` (tensors or param-group dicts)."""
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    return resolve_callable(optimizer, "model.optimizer")(params)


def build_scheduler(
    optimizer: Optimizer, scheduler: Any = WARMUP_COSINE, total_steps: int | None = None
) -> LRScheduler | None:
    """Build ``scheduler`` (a spec dict, class, callable or ``None``) for ``optimizer``; a ``total_steps``
    attribute left at ``None`` is set to ``total_steps``."""
    if scheduler is None:
        return None
    built = resolve_callable(scheduler, "model.scheduler")(optimizer)
    if total_steps is not None and hasattr(built, "total_steps") and built.total_steps is None:
        built.total_steps = max(1, int(total_steps))
        # recompute the current learning rate with the now known horizon (step 0: unchanged)
        if isinstance(built, WarmupCosine):
            for group, lr in zip(optimizer.param_groups, built.get_lr(), strict=True):
                group["lr"] = lr
            built._last_lr = [group["lr"] for group in optimizer.param_groups]
    return built
