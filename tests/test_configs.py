"""Every shipped config parses against the current code (``fit --print_config``, nothing instantiated).

A renamed init argument, a removed option or a typo in a config that no other test runs (the online
GPU recipes above all) fails here, with the file named, instead of on a user's cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from robustft.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "trainer" not in p.relative_to(REPO / "configs").parts)


def test_every_method_folder_has_configs() -> None:
    assert len(CONFIGS) >= 10, [str(p) for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_parses(path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(path.relative_to(REPO)), "--print_config"])
    assert done.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("robustft.methods.")
    assert printed["data"]["class_path"].startswith("robustft.data.")
