"""The leaderboard machinery (robustft.leaderboard), not its numbers.

- cells files are validated with the cell and field named;
- a rerun reuses every finished step; a changed step reruns from that step on; a failed step names the
  cell and command and leaves earlier steps reusable; an unfinished ``fit`` resumes from ``last.ckpt``;
- reports computed on different test data are refused; a method without a classifier shows "n/a";
- end to end in CI: two micro cells through the real CLI give a table with the right rows and columns
  and figures, and a rerun runs no subprocess at all.
"""

from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from robustft import leaderboard as lb

REPO = Path(__file__).resolve().parents[2]
MICRO_CELLS = REPO / "tests" / "conf" / "leaderboard_micro.yaml"


def _write_cells(tmp_path: Path, cells: dict, **top) -> Path:
    path = tmp_path / "cells.yaml"
    path.write_text(yaml.safe_dump({"cells": cells, **top}, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("cells", "message"),
    [
        ({"a": {"label": "A", "steps": ["fit --config x.yaml"], "color": "red"}}, "cell 'a': unknown key(s) ['color']"),
        ({"a": {"label": "A", "steps": []}}, "cell 'a': 'steps' is empty"),
        ({"a": {"label": "A", "steps": ["train --config x.yaml"]}}, "must start with one of"),
        ({"a": {"label": "A", "steps": ["fit"], "needs": ["b"]}}, "'needs' names ['b']"),
    ],
)
def test_cells_file_errors_name_the_cell_and_field(tmp_path: Path, cells: dict, message: str) -> None:
    with pytest.raises(lb.LeaderboardError) as err:
        lb.load_cells(_write_cells(tmp_path, cells))
    assert message in str(err.value)


def test_missing_eval_sets_file_is_named(tmp_path: Path) -> None:
    path = _write_cells(tmp_path, {"a": {"steps": ["fit"]}}, eval_sets=str(tmp_path / "nope.yaml"))
    with pytest.raises(lb.LeaderboardError, match="eval_sets file .*nope.yaml does not exist"):
        lb.load_cells(path)


def test_evaluate_steps_get_the_shared_test_sets_and_a_report_dir(tmp_path: Path) -> None:
    sets = tmp_path / "sets.yaml"
    sets.write_text("data: {}\n")
    cells, eval_sets = lb.load_cells(_write_cells(
        tmp_path, {"a": {"steps": ["fit --config m.yaml --x {out}", "evaluate --config m.yaml"]}}, eval_sets=str(sets)))
    root = tmp_path / "runs"
    assert cells[0].argv(0, root, eval_sets) == ["fit", "--config", "m.yaml", "--x", str(root / "a")]
    # the shared sets come AFTER the method's config, so they win
    assert cells[0].argv(1, root, eval_sets) == ["evaluate", "--config", "m.yaml", "--config", str(sets),
                                                 "--report_dir", str(root / "a" / "report")]
    assert cells[0].report_path(root) == root / "a" / "report" / "report.json"


@pytest.fixture
def fake_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """An executable standing in for python: logs its arguments; fails on a step containing 'boom'."""
    log = tmp_path / "calls.log"
    script = tmp_path / "fake_python"
    script.write_text('#!/bin/sh\necho "$@" >> "$FAKE_LOG"\ncase "$*" in *boom*) exit 3;; esac\nexit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("FAKE_LOG", str(log))
    return str(script), log


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_rerun_reuses_finished_steps_and_a_changed_step_reruns_from_there(tmp_path: Path, fake_python) -> None:
    python, log = fake_python
    spec = {"a": {"steps": ["fit --s 1", "evaluate --s 2"]}, "b": {"steps": ["fit --s 3", "evaluate --s 4"]}}
    root = tmp_path / "runs"
    cells, _ = lb.load_cells(_write_cells(tmp_path, spec))
    first = lb.run_cells(cells, root, python=python, echo=lambda _: None)
    assert [(r.name, r.ran, r.reused) for r in first] == [("a", [0, 1], []), ("b", [0, 1], [])]
    assert len(_calls(log)) == 4

    again = lb.run_cells(cells, root, python=python, echo=lambda _: None)
    assert [(r.ran, r.reused) for r in again] == [([], [0, 1]), ([], [0, 1])]
    assert len(_calls(log)) == 4  # nothing ran

    changed = copy.deepcopy(spec)
    changed["b"]["steps"][0] = "fit --s 30"  # b's first step changed: b reruns both steps, a nothing
    cells, _ = lb.load_cells(_write_cells(tmp_path, changed))
    third = lb.run_cells(cells, root, python=python, echo=lambda _: None)
    assert [(r.ran, r.reused) for r in third] == [([], [0, 1]), ([0, 1], [])]
    assert _calls(log)[4:] == ["-m robustft fit --s 30", f"-m robustft evaluate --s 4 --report_dir {root / 'b' / 'report'}"]


def test_a_failed_step_names_the_cell_and_keeps_earlier_steps(tmp_path: Path, fake_python) -> None:
    python, log = fake_python
    cells, _ = lb.load_cells(_write_cells(tmp_path, {"a": {"steps": ["fit --ok", "evaluate --boom"]}}))
    with pytest.raises(lb.LeaderboardError, match=r"cell 'a' step 2 failed \(exit 3\).*evaluate --boom"):
        lb.run_cells(cells, tmp_path / "runs", python=python, echo=lambda _: None)
    fixed, _ = lb.load_cells(_write_cells(tmp_path, {"a": {"steps": ["fit --ok", "evaluate --fixed"]}}))
    runs = lb.run_cells(fixed, tmp_path / "runs", python=python, echo=lambda _: None)
    assert (runs[0].ran, runs[0].reused) == ([1], [0])
    assert [c.split()[2] for c in _calls(log)] == ["fit", "evaluate", "evaluate"]


def test_an_unfinished_fit_resumes_from_its_last_checkpoint(tmp_path: Path, fake_python) -> None:
    python, log = fake_python
    ckpt = tmp_path / "runs" / "a" / "tb" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")  # a fit that died after its first checkpoint
    cells, _ = lb.load_cells(_write_cells(tmp_path, {"a": {"steps": ["fit --config m.yaml"]}}))
    lb.run_cells(cells, tmp_path / "runs", python=python, echo=lambda _: None)
    assert _calls(log) == [f"-m robustft fit --config m.yaml --ckpt_path {ckpt}"]


def test_a_later_fit_step_never_resumes_from_an_earlier_steps_checkpoint(tmp_path: Path, fake_python) -> None:
    python, log = fake_python
    root = tmp_path / "runs"
    pretrain = root / "a" / "pretrain" / "checkpoints" / "last.ckpt"
    pretrain.parent.mkdir(parents=True)
    pretrain.write_bytes(b"")  # step 1 finished: its checkpoint stays in its own folder
    spec = {"a": {"steps": ["fit --trainer.default_root_dir {out}/pretrain", "fit --trainer.default_root_dir {out}/probe"]}}
    cells, _ = lb.load_cells(_write_cells(tmp_path, spec))
    lb.run_cells(cells, root, only=None, python=python, echo=lambda _: None)
    calls = _calls(log)
    assert calls[1] == f"-m robustft fit --trainer.default_root_dir {root / 'a' / 'probe'}"  # a fresh probe
    assert calls[0].endswith(f"--ckpt_path {pretrain}")  # the unfinished pre-training itself does resume


def test_only_runs_the_named_cells_and_what_they_need(tmp_path: Path, fake_python) -> None:
    python, _ = fake_python
    spec = {"pre": {"steps": ["fit --p"]}, "a": {"steps": ["fit --a"], "needs": ["pre"]}, "b": {"steps": ["fit --b"]}}
    cells, _ = lb.load_cells(_write_cells(tmp_path, spec))
    runs = lb.run_cells(cells, tmp_path / "runs", only=["a"], python=python, echo=lambda _: None)
    assert [r.name for r in runs] == ["pre", "a"]
    with pytest.raises(lb.LeaderboardError, match=r"unknown cell\(s\) \['c'\]"):
        lb.run_cells(cells, tmp_path / "runs", only=["c"], python=python, echo=lambda _: None)


def _report(id_n: int = 100, tin_n: int = 50, acc: float | None = 0.9) -> dict:
    row = {"auroc": 0.8, "aupr_in": 0.8, "aupr_out": 0.8, "fpr95": 0.5, "fpr95_openood": 0.5, "n": tin_n}
    return {"id": {"acc": acc, "n": id_n}, "ood": {"tin": {"msp": row}},
            "groups": {"near": {"msp": {**row, "sets": ["tin"]}}}, "meta": {"default_score": "msp"}}


def _cells_with_reports(tmp_path: Path, reports: dict[str, dict]) -> list[lb.Cell]:
    cells = []
    for name, report in reports.items():
        path = tmp_path / name / "report" / "report.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(report))
        cells.append(lb.Cell(name=name, label=name.upper(), steps=(("evaluate",),)))
    return cells


def test_reports_on_different_test_data_are_refused(tmp_path: Path) -> None:
    cells = _cells_with_reports(tmp_path, {"a": _report(), "b": _report(tin_n=49)})
    with pytest.raises(lb.LeaderboardError, match="cell 'b' was evaluated on other test data than 'a'"):
        lb.build_table(cells, tmp_path, {})


def test_a_method_without_a_classifier_shows_na(tmp_path: Path) -> None:
    report = _report(acc=None)
    report["meta"]["id_acc_note"] = "no classifier"
    table = lb.build_table(_cells_with_reports(tmp_path, {"a": report}), tmp_path, {"a": 90.0})
    assert table["rows"][0]["id_acc"] is None and table["rows"][0]["minutes"] == 1.5
    paths = lb.write_table(table, tmp_path / "table")
    assert "| A | msp | n/a (no classifier) | 80.00 | 50.00 | n/a | n/a | 1.5 |" in paths["md"].read_text()


@pytest.mark.slow
def test_micro_leaderboard_end_to_end_then_a_rerun_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--cells", str(MICRO_CELLS), "--out", str(tmp_path / "runs"), "--table", str(tmp_path / "table")]
    assert lb.main(args) == 0
    table = json.loads((tmp_path / "table" / "leaderboard.json").read_text())
    assert [r["cell"] for r in table["rows"]] == ["ce_tiny", "resnet20_pretrained"]
    assert [r["score"] for r in table["rows"]] == ["energy", "msp"]  # the cell's choice, else the report's default
    for row in table["rows"]:
        assert set(lb.COLUMNS) <= set(row) and set(row["sets"]) == {"tin", "dtd"}
        assert 0.5 < row["id_acc"] <= 1 and 0.5 < row["near_auroc"] <= 1 and 0.5 < row["far_auroc"] <= 1
    assert table["test_data"]["id_n"] == 200 and table["test_data"]["ood"] == [["dtd", 100], ["tin", 100]]
    header = (tmp_path / "table" / "leaderboard.csv").read_text().splitlines()[0]
    assert header == ",".join([*lb.COLUMNS, "id_acc_note"])
    for name in ("leaderboard_scatter.png", "leaderboard_sets.png"):
        assert (tmp_path / "table" / name).stat().st_size > 1000
    # the cell's evaluate read the shared sets, not the method config's (400 ID test images there)
    report = json.loads((tmp_path / "runs" / "ce_tiny" / "report" / "report.json").read_text())
    assert report["id"]["n"] == 200

    def no_subprocess(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError(f"a rerun must reuse every finished step, but it ran {a}")

    monkeypatch.setattr(lb.subprocess, "run", no_subprocess)
    before = (tmp_path / "table" / "leaderboard.md").read_text()
    assert lb.main(args) == 0
    assert (tmp_path / "table" / "leaderboard.md").read_text() == before
    assert os.path.getsize(tmp_path / "table" / "leaderboard.json") > 0


def test_glob_placeholders_resolve_when_the_step_starts(tmp_path: Path, fake_python) -> None:
    python, log = fake_python
    spec = {"a": {"steps": ["average --x", "evaluate --ckpt_path {glob:{out}/avg/averaged_alpha*.ckpt}"]}}
    cells, _ = lb.load_cells(_write_cells(tmp_path, spec))
    root = tmp_path / "runs"
    with pytest.raises(lb.LeaderboardError, match=r"matches 0 files .* must match exactly one"):
        lb.run_cells(cells, root, python=python, echo=lambda _: None)
    chosen = root / "a" / "avg" / "averaged_alpha0.50.ckpt"
    chosen.parent.mkdir(parents=True)
    chosen.write_bytes(b"")  # what the average step would have written
    runs = lb.run_cells(cells, root, python=python, echo=lambda _: None)
    assert (runs[0].ran, runs[0].reused) == ([1], [0])
    assert _calls(log)[-1].startswith(f"-m robustft evaluate --ckpt_path {chosen} ")


def test_python_steps_run_a_script_with_the_same_interpreter(tmp_path: Path, fake_python) -> None:
    python, log = fake_python
    cells, _ = lb.load_cells(_write_cells(tmp_path, {"a": {"steps": ["python tools/prepare.py --out {out}/x.npz"]}}))
    lb.run_cells(cells, tmp_path / "runs", python=python, echo=lambda _: None)
    assert _calls(log) == [f"tools/prepare.py --out {tmp_path / 'runs' / 'a' / 'x.npz'}"]
