"""The score contract (:class:`OODScore`), the registry and the helpers every score family shares.

:class:`FeatureScore` is the base of every score that reads one feature matrix from the outputs (KNN,
MDS, RMDS, ViM, ReAct, ASH): which output it reads is its ``feature_key`` hyper-parameter (default
``"features"``), so the same class scores a method's penultimate features, a projection ``embedding`` or
an intermediate layer, e.g. ``score_kwargs: {knn: {feature_key: embedding, k: 50}}``. ``requires`` and
``reference_requires`` of an *instance* name that key; the class attributes keep the default, so
checks on a class (``SCORES.get("knn").requires``) still see ``{"features"}``. ``feature_key`` selects
the data, it is never tuned: no ``search_space`` may contain it (checked when a class is defined).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from robustft.registry import Registry

__all__ = ["DEFAULT_FEATURE_KEY", "SCORES", "FeatureScore", "Head", "OODScore"]

Head = tuple[Tensor, Tensor | None]

#: the output key feature scores read unless told otherwise
DEFAULT_FEATURE_KEY = "features"
#: keys the evaluation adds to every output dict itself; a score cannot read its features from them
_RESERVED_KEYS = frozenset({"labels", "index"})

SCORES: Registry[type[OODScore]] = Registry("OOD score")


# ---------------------------------------------------------------------------------------------------
# small helpers


def _fmt_set(names: Iterable[str]) -> str:
    return "{" + ", ".join(repr(n) for n in sorted(names)) + "}"


def _floating(x: Tensor) -> Tensor:
    """``x`` detached, in its floating dtype but at least float32 (half inputs are upcast)."""
    x = torch.as_tensor(x).detach()
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _result(score: Tensor, like: Tensor) -> Tensor:
    return score.to(torch.promote_types(like.dtype, torch.float32))


def _features(outputs: Mapping[str, Tensor], key: str = DEFAULT_FEATURE_KEY) -> Tensor:
    x = _floating(outputs[key])
    if x.ndim != 2:
        raise ValueError(
            f"'{key}' must be a [N, D] tensor, got shape {tuple(x.shape)} "
            "(pool or flatten it in forward_eval)"
        )
    return x


def _dedupe(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _check_head(head: Head) -> tuple[Tensor, Tensor]:
    try:
        weight, bias = head
    except (TypeError, ValueError):
        raise ValueError("head must be a pair (W [K, D], b [K] or None)") from None
    weight = torch.as_tensor(weight).detach()
    if weight.ndim != 2:
        raise ValueError(f"head weight must be [K, D], got shape {tuple(weight.shape)}")
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    bias = torch.as_tensor(bias).detach().to(weight.device)
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"head bias must be [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    return weight, bias


def _unknown_hyperparameters(cls: type[OODScore], name: str, given: Iterable[str]) -> TypeError:
    valid = cls.hyperparameters()
    unknown = [k for k in given if k not in valid]
    hint = f"valid: {', '.join(repr(v) for v in valid)}" if valid else "it takes none"
    return TypeError(
        f"score '{name}' got unknown hyper-parameter(s) {', '.join(repr(u) for u in unknown)}; {hint}"
    )


# ---------------------------------------------------------------------------------------------------
# base classes


class OODScore:
    """Base: higher score = more in-distribution.

    Subclasses declare their hyper-parameters as keyword-only ``__init__`` arguments stored under the
    same attribute names, implement ``_score(outputs) -> [B]`` and, when they need ID statistics or
    the classifier head, ``_fit(reference, head)``.

    ``requires`` and ``reference_requires`` are class defaults that an instance may narrow to what it
    actually reads (see :class:`FeatureScore`); requirement checks use the instance when they have one.
    """

    name: ClassVar[str] = "score"
    #: keys of the output dict the score reads
    requires: frozenset[str] = frozenset()
    needs_head: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = False
    #: keys that ``fit`` needs in the reference dict (only checked when ``needs_fit``)
    reference_requires: frozenset[str] = frozenset()
    search_space: ClassVar[dict[str, list]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "feature_key" in cls.search_space:
            raise TypeError(f"{cls.__name__}.search_space must not tune 'feature_key': it selects the data")

    def __init__(self, **hyperparameters: Any) -> None:
        if hyperparameters:
            raise _unknown_hyperparameters(type(self), self.name, hyperparameters)
        self._fitted = False

    # -- introspection ----------------------------------------------------------------------------
    @classmethod
    def hyperparameters(cls) -> dict[str, Any]:
        """Hyper-parameter names and defaults (the keyword-only arguments of ``__init__``)."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    @property
    def hparams(self) -> dict[str, Any]:
        """This instance's hyper-parameter values."""
        return {n: getattr(self, n) for n in self.hyperparameters()}

    @classmethod
    def search_grid(
        cls,
        reference: Mapping[str, Tensor] | None = None,
        head: Head | None = None,
        fixed: Mapping[str, Any] | None = None,
    ) -> dict[str, list]:
        """The tuning grid, adapted to the data where a value would be invalid (default: ``search_space``).

        ``fixed``: the hyper-parameters held constant while tuning (e.g. ``feature_key``), so a grid
        that depends on the data looks at the right output.
        """
        return {k: list(v) for k, v in cls.search_space.items()}

    @property
    def is_fitted(self) -> bool:
        return self._fitted or not (self.needs_fit or self.needs_head)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({args})"

    # -- fit / call -------------------------------------------------------------------------------
    def fit(self, reference: Mapping[str, Tensor] | None, head: Head | None = None) -> None:
        """Collect what the score needs from the ID training outputs and/or the linear head.

        ``reference``: outputs over the ID training set, e.g. ``"features"`` [N, D], ``"logits"`` [N, K],
        ``"labels"`` [N] (only the keys in ``reference_requires`` are read). ``head``: ``(W [K, D],
        b [K] or None)``. A no-op for scores that need neither.
        """
        reference = dict(reference or {})
        if self.needs_fit:
            missing = self.reference_requires - reference.keys()
            if missing:
                raise ValueError(
                    f"score '{self.name}' is fitted on ID training outputs {_fmt_set(self.reference_requires)}"
                    f" but the reference has {_fmt_set(reference)}"
                )
        w_b: tuple[Tensor, Tensor] | None = None
        if self.needs_head:
            if head is None:
                raise ValueError(
                    f"score '{self.name}' needs the classifier head: call fit(reference, head=(W, b))"
                )
            w_b = _check_head(head)
        with torch.no_grad():
            used = {
                k: torch.as_tensor(reference[k]).detach() for k in self.reference_requires if k in reference
            }
            self._fit(used, w_b)
        self._fitted = True

    def _fit(self, reference: dict[str, Tensor], head: tuple[Tensor, Tensor] | None) -> None:
        return None

    def __call__(self, outputs: Mapping[str, Tensor]) -> Tensor:
        """Scores ``[B]`` for a batch of ``forward_eval`` outputs; higher = more in-distribution."""
        missing = self.requires - outputs.keys()
        if missing:
            raise KeyError(
                f"score '{self.name}' needs outputs {_fmt_set(self.requires)} but got {_fmt_set(outputs)}"
            )
        if not self.is_fitted:
            needs = [
                w
                for w, n in (("the ID training outputs", self.needs_fit), ("head=(W, b)", self.needs_head))
                if n
            ]
            raise RuntimeError(
                f"score '{self.name}' is not fitted: call score.fit(reference, head) with "
                f"{' and '.join(needs)} before scoring"
            )
        device = torch.as_tensor(outputs[min(self.requires)]).device if self.requires else None
        if device is not None:
            self._move_state(device)
        with torch.no_grad():
            return self._score(outputs)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def _move_state(self, device: torch.device) -> None:
        moves = {k: v for k, v in vars(self).items() if isinstance(v, Tensor) and v.device != device}
        for k, v in moves.items():
            setattr(self, k, v.to(device))


class FeatureScore(OODScore):
    """Base of the scores that read one ``[N, D]`` feature matrix, from the output ``feature_key``.

    The class-level ``requires`` / ``reference_requires`` are written with ``"features"``; an instance
    replaces ``"features"`` by its ``feature_key`` in both (``labels`` and the like stay). Every subclass
    that defines ``__init__`` must take ``feature_key`` as a keyword-only argument and pass it on, so that
    it is a hyper-parameter (``build_score("knn", feature_key="embedding")``).
    """

    requires = frozenset({DEFAULT_FEATURE_KEY})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "feature_key" not in cls.hyperparameters():
            raise TypeError(f"{cls.__name__}.__init__ must take a keyword-only 'feature_key' argument")

    def __init__(self, *, feature_key: str = DEFAULT_FEATURE_KEY) -> None:
        super().__init__()
        if not isinstance(feature_key, str) or not feature_key:
            raise ValueError(
                f"score '{self.name}': feature_key must be a non-empty output key, got {feature_key!r}"
            )
        if feature_key in _RESERVED_KEYS:
            raise ValueError(
                f"score '{self.name}': feature_key {feature_key!r} is reserved for "
                f"{_fmt_set(_RESERVED_KEYS)} that evaluation adds; name a feature output of the method"
            )
        self.feature_key = feature_key
        cls = type(self)
        self.requires = frozenset(feature_key if k == DEFAULT_FEATURE_KEY else k for k in cls.requires)
        self.reference_requires = frozenset(
            feature_key if k == DEFAULT_FEATURE_KEY else k for k in cls.reference_requires
        )

    def features(self, outputs: Mapping[str, Tensor]) -> Tensor:
        """The ``[N, D]`` matrix under ``feature_key``, detached, at least float32."""
        return _features(outputs, self.feature_key)

    @staticmethod
    def _grid_key(fixed: Mapping[str, Any] | None) -> str:
        return str((fixed or {}).get("feature_key", DEFAULT_FEATURE_KEY))
