"""Report building (group means), file round trips, atomic writes and error messages."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from robustft.ood.metrics import METRIC_KEYS, ood_metrics
from robustft.ood.report import (
    CSV_COLUMNS,
    GROUP_ROW_SET,
    ReportDirError,
    build_report,
    check_writable,
    compare_reports,
    format_table,
    write_report,
)

SETS = ["cifar10", "tin", "mnist", "svhn", "places"]
SCORES = ["msp", "energy"]
GROUPS = {"near": ["cifar10", "tin"], "far": ["mnist", "svhn", "places"], "empty": []}


def make_per_set(seed: int = 0) -> dict[str, dict[str, dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    per_set: dict[str, dict[str, dict[str, Any]]] = {}
    for i, set_name in enumerate(SETS):
        per_set[set_name] = {}
        for score in SCORES:
            n_ood = 40 + 10 * i
            metrics: dict[str, Any] = ood_metrics(rng.normal(1, 1, 60), rng.normal(0, 1, n_ood))
            metrics["n"] = n_ood
            per_set[set_name][score] = metrics
    return per_set


@pytest.fixture
def report() -> dict[str, Any]:
    return build_report(0.9123, 10000, make_per_set(), GROUPS, {"ckpt": Path("/ckpt/last.ckpt"), "seed": 0})


def test_group_rows_are_unweighted_means(report: dict[str, Any]) -> None:
    assert set(report["groups"]) == {"near", "far"}  # the empty group is omitted
    per_set = make_per_set()
    for group in ("near", "far"):
        for score in SCORES:
            row = report["groups"][group][score]
            assert row["sets"] == GROUPS[group]
            for key in METRIC_KEYS:
                expected = np.mean([per_set[s][score][key] for s in GROUPS[group]])
                assert row[key] == pytest.approx(expected, abs=1e-15)
            assert row["n"] == sum(per_set[s][score]["n"] for s in GROUPS[group])
    assert report["id"] == {"acc": 0.9123, "n": 10000}
    assert report["ood"]["tin"]["msp"]["n"] == 50


def test_build_rejects_unknown_sets_and_missing_metrics() -> None:
    per_set = make_per_set()
    with pytest.raises(ValueError, match=r"group 'near' lists OOD sets without metrics: \['typo'\]"):
        build_report(0.9, 10, per_set, {"near": ["typo"]}, {})
    del per_set["tin"]["msp"]["aupr_out"]
    with pytest.raises(ValueError, match=r"tin/msp lack \['aupr_out'\]"):
        build_report(0.9, 10, per_set, {}, {})
    per_set = make_per_set()
    del per_set["tin"]["energy"]
    with pytest.raises(ValueError, match=r"score 'energy' has no metrics on \['tin'\]"):
        build_report(0.9, 10, per_set, {"near": ["cifar10", "tin"]}, {})
    with pytest.raises(ValueError, match=r"score 'energy' has no metrics on \['tin'\]"):
        build_report(0.9, 10, per_set, {"near": ["tin", "cifar10"]}, {})  # order does not matter


def test_write_round_trip(report: dict[str, Any], tmp_path: Path) -> None:
    paths = write_report(report, tmp_path / "nested" / "dir")
    assert set(paths) == {"json", "csv", "md"}
    assert all(p.name == f"report.{kind}" and p.is_file() for kind, p in paths.items())

    loaded = json.loads(paths["json"].read_text())
    expected = copy.deepcopy(report)
    expected["meta"]["ckpt"] = "/ckpt/last.ckpt"  # paths are written as strings
    assert loaded == expected

    with paths["csv"].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS
    n_groups = 2
    assert len(rows) == len(SETS) * len(SCORES) + n_groups * len(SCORES)
    row = next(r for r in rows if r["set"] == "mnist" and r["score"] == "energy")
    assert row["group"] == "far"
    assert float(row["auroc"]) == report["ood"]["mnist"]["energy"]["auroc"]  # lossless
    mean = next(r for r in rows if r["set"] == GROUP_ROW_SET and r["group"] == "near" and r["score"] == "msp")
    assert float(mean["fpr95"]) == report["groups"]["near"]["msp"]["fpr95"]

    md = paths["md"].read_text()
    assert md.splitlines()[2] == "**ID accuracy: 91.23% (n = 10000)**"
    auroc = report["ood"]["tin"]["msp"]["auroc"]
    assert f"| tin | near | msp | {100 * auroc:.2f} |" in md


def test_write_overwrites_and_leaves_no_temporary_files(report: dict[str, Any], tmp_path: Path) -> None:
    write_report(report, tmp_path)
    report["id"]["acc"] = 0.5
    write_report(report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv", "report.json", "report.md"]
    assert json.loads((tmp_path / "report.json").read_text())["id"]["acc"] == 0.5


def test_failed_serialisation_writes_nothing(report: dict[str, Any], tmp_path: Path) -> None:
    report["meta"]["bad"] = object()
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_report(report, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_directory_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    target = blocker / "reports"
    with pytest.raises(
        ReportDirError, match=r"cannot create report directory '.*a_file/reports'.*report_dir"
    ):
        check_writable(target)
    with pytest.raises(ReportDirError):
        write_report({"id": {}, "ood": {}, "groups": {}, "meta": {}}, target)
    assert check_writable(tmp_path / "ok") == tmp_path / "ok"
    assert list((tmp_path / "ok").iterdir()) == []  # the probe file is removed


def test_format_table_is_aligned(report: dict[str, Any]) -> None:
    text = format_table(report)
    lines = text.splitlines()
    assert lines[0] == "ID accuracy: 91.23% (n = 10000)"
    header, rule, *body = lines[1:]
    assert "FPR@95 (OpenOOD)" in header
    assert len(body) == len(SETS) * len(SCORES) + 2 * len(SCORES)
    assert any(line.startswith("near mean") for line in body)
    # right-aligned numeric columns end at the same offsets as the rule's dashes
    assert len({len(line) for line in body}) == 1
    assert len(body[0]) == len(rule.rstrip())


def test_compare_reports(report: dict[str, Any]) -> None:
    same = copy.deepcopy(report)
    same["meta"]["seed"] = 123  # meta is ignored by default
    assert compare_reports(report, same) == []
    assert compare_reports(report, same, ignore=()) == ["meta.seed: 0 vs 123"]

    perturbed = copy.deepcopy(report)
    perturbed["ood"]["svhn"]["energy"]["auroc"] += 1e-3
    perturbed["groups"]["near"]["msp"]["fpr95"] += 1e-9  # within atol
    del perturbed["ood"]["places"]["msp"]
    diffs = compare_reports(report, perturbed, atol=1e-6)
    assert len(diffs) == 2
    assert diffs[0].startswith("ood.places.msp: only in first")
    assert diffs[1].startswith("ood.svhn.energy.auroc: ") and "> atol 1e-06" in diffs[1]
    assert compare_reports(report, perturbed, atol=1e-2) == ["ood.places.msp: only in first"]


def test_compare_reports_lists_and_nan() -> None:
    a = {"groups": {"near": {"msp": {"sets": ["x", "y"], "auroc": float("nan")}}}}
    b = {"groups": {"near": {"msp": {"sets": ["x", "z"], "auroc": float("nan")}}}}
    assert compare_reports(a, b) == ["groups.near.msp.sets[1]: 'y' vs 'z'"]
    b["groups"]["near"]["msp"]["sets"] = ["x", "y"]
    b["groups"]["near"]["msp"]["auroc"] = 0.5
    assert compare_reports(a, b) == ["groups.near.msp.auroc: nan vs 0.5"]
