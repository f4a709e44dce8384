"""The CLI imports the module of every method a command names by bare class name before parsing (issue 18),
so ``robustft.methods`` can export heavy methods lazily (PEP 562) without breaking ``class_path: Name``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import robustft.methods
from robustft.cli import _bare_class_names, import_named_methods


def test_bare_names_from_flags_and_nested_configs(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "LazyMethod", "init_args": {"x": 1}},
        "data": "ShortData",
        "trainer": {"callbacks": [{"class_path": "robustft.callbacks.OODEvaluation"}]},
        "fit": {"model": "NestedMethod"},
    }))
    names = _bare_class_names(["fit", "--config", str(config), "--model.class_path=FlagMethod", "--data", "{a: 1}"])
    assert names == {"LazyMethod", "ShortData", "NestedMethod", "FlagMethod"}  # dotted paths and dicts are not names


def test_named_methods_are_requested_from_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    requested: list[str] = []

    def lazy(name: str) -> object:  # what a PEP 562 export does: import on first access
        requested.append(name)
        raise AttributeError(name)

    monkeypatch.setattr(robustft.methods, "__getattr__", lazy, raising=False)
    import_named_methods(["fit", "--model=LazyMethod", "--model.class_path", "Classifier"])
    assert requested == ["LazyMethod"]  # Classifier is already imported: no lookup needed
