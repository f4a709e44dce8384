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


def _run(code: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_cli_imports_no_heavy_optional_library_until_a_method_needs_it() -> None:
    """``fit --help`` and a ResNet run import the CLI and the eager methods only: open_clip (with timm and
    transformers), webdataset and tensorboard load when a CLIP method, a shard stream or a logger is used."""
    out = _run("import sys, robustft.cli, robustft.methods as m; m.Classifier; m.PALM; m.LOOK; m.LEVI; m.DROSSL\n"
               "print(sorted(x for x in ('open_clip', 'timm', 'webdataset', 'tensorboard') if x in sys.modules))")
    assert out.strip() == "[]"
    out = _run("import sys, robustft.methods as m; m.CLIPN; print('open_clip' in sys.modules)")
    assert out.strip() == "True"  # the lazy export imports its module on first access


def test_a_lazily_exported_method_is_found_by_its_bare_name_in_a_subprocess(tmp_path: Path) -> None:
    code = ("import sys\nfrom robustft.cli import main\n"
            "try:\n    main(['fit', '--config', 'tests/conf/tiny_classifier.yaml', '--model', 'ZeroShotCLIP', "
            "'--model.init_args.clip_model', 'robustft-micro-vit', '--print_config'])\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n")
    assert "class_path: robustft.methods.ZeroShotCLIP" in _run(code)
