"""Evaluation report: one dict, written as JSON (machines), CSV (spreadsheets) and Markdown (people).

Report shape::

    {"id": {"acc": float, "n": int},
     "ood": {"<set>": {"<score>": {"auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood", "n"}}},
     "groups": {"near": {"<score>": {<metric means>, "n": total OOD samples, "sets": [names]}},
                "far": {...}},
     "meta": {...}}

Metrics are fractions in [0, 1] everywhere except the Markdown / terminal tables, which show
percentages. Group rows are the *unweighted* mean over the group's sets (OpenOOD's near/far rows), not
metrics of pooled samples, so a large set does not drown a small one.

Files are written atomically (temporary file in the same directory, then ``os.replace``): a job killed
mid-write leaves the previous report or none, never a truncated one that a later comparison would
half-read. :func:`check_writable` exists so that evaluation entry points fail in the first second,
not after an hour of feature extraction, when the report directory is unusable.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from robustft.io import atomic_write_text
from robustft.ood.metrics import METRIC_KEYS

__all__ = [
    "CSV_COLUMNS",
    "GROUP_ROW_SET",
    "ReportDirError",
    "build_report",
    "check_writable",
    "compare_reports",
    "format_table",
    "write_report",
]

CSV_COLUMNS: tuple[str, ...] = ("set", "group", "score", *METRIC_KEYS, "n")
GROUP_ROW_SET = "mean"
"""Value of the ``set`` column on group-mean rows of the CSV (``group`` says which group)."""

_HEADERS: dict[str, str] = {
    "auroc": "AUROC",
    "aupr_in": "AUPR-In",
    "aupr_out": "AUPR-Out",
    "fpr95": "FPR@95",
    "fpr95_openood": "FPR@95 (OpenOOD)",
}
_LEGEND = (
    "FPR@95: FPR of OOD samples at 95% TPR of ID samples (ODIN/Hendrycks convention). "
    "FPR@95 (OpenOOD): FPR of ID samples at 95% TPR of OOD samples (OpenOOD v1.5 convention). "
    "Group rows are unweighted means over their sets."
)


class ReportDirError(OSError):
    """The report directory cannot be created or written."""


# --------------------------------------------------------------------------------------- building


def _metric_row(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Copy one metric row as plain python numbers, insisting on all five metrics.

    Plain floats / ints (not tensors or numpy scalars) so the report is JSON-serialisable and
    compares equal after a round trip.
    """
    missing = [key for key in METRIC_KEYS if key not in values]
    if missing:
        raise ValueError(f"metrics for {where} lack {missing}; expected keys {list(METRIC_KEYS)}")
    row: dict[str, Any] = {key: float(values[key]) for key in METRIC_KEYS}
    if "n" in values:
        row["n"] = int(values["n"])
    return row


def _group_rows(
    name: str, sets: Sequence[str], ood: Mapping[str, Mapping[str, Mapping[str, Any]]]
) -> dict[str, dict[str, Any]]:
    """Mean of each metric over ``sets``, per score; every set must have every score.

    A score missing from one set would make its mean cover different sets than its neighbours',
    so that is an error rather than a silently different average.
    """
    unknown = [s for s in sets if s not in ood]
    if unknown:
        raise ValueError(f"group '{name}' lists OOD sets without metrics: {unknown}; known: {sorted(ood)}")
    scores = list(dict.fromkeys(score for s in sets for score in ood[s]))  # ordered union
    rows: dict[str, dict[str, Any]] = {}
    for score in scores:
        lacking = [s for s in sets if score not in ood[s]]
        if lacking:
            raise ValueError(f"group '{name}': score '{score}' has no metrics on {lacking}")
        members = [ood[s][score] for s in sets]
        row: dict[str, Any] = {key: math.fsum(m[key] for m in members) / len(members) for key in METRIC_KEYS}
        if all("n" in m for m in members):
            row["n"] = sum(int(m["n"]) for m in members)
        row["sets"] = list(sets)
        rows[score] = row
    return rows


def build_report(
    id_acc: float,
    id_n: int,
    per_set: Mapping[str, Mapping[str, Mapping[str, Any]]],
    groups: Mapping[str, Sequence[str]],
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """Assemble the report dict from per-(set, score) metrics.

    Args:
        id_acc: top-1 accuracy on the ID test set, a fraction.
        id_n: number of ID test samples.
        per_set: ``{set: {score: {metric: value, ..., "n": n_ood}}}`` as returned by
            :func:`robustft.ood.metrics.ood_metrics` plus the sample count.
        groups: ``{"near": [sets], "far": [sets]}``; groups with no sets are left out.
        meta: free-form provenance (checkpoint, config, versions), copied as is.
    """
    ood = {
        set_name: {score: _metric_row(values, f"{set_name}/{score}") for score, values in scores.items()}
        for set_name, scores in per_set.items()
    }
    group_rows = {name: _group_rows(name, list(sets), ood) for name, sets in groups.items() if len(sets)}
    return {
        "id": {"acc": float(id_acc), "n": int(id_n)},
        "ood": ood,
        "groups": group_rows,
        "meta": dict(meta),
    }


# --------------------------------------------------------------------------------------- rows


def _set_groups(report: Mapping[str, Any]) -> dict[str, list[str]]:
    """Which groups each set belongs to (usually one, possibly none)."""
    membership: dict[str, list[str]] = {}
    for group, scores in report["groups"].items():
        sets = next(iter(scores.values()))["sets"] if scores else []
        for set_name in sets:
            membership.setdefault(set_name, []).append(group)
    return membership


def _rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flat rows in display order: each group's sets then its mean, then sets in no group.

    Rows are (set, score) pairs; ``set`` is :data:`GROUP_ROW_SET` on group-mean rows. A set listed
    in two groups appears under each, with that group in the ``group`` column.
    """
    membership = _set_groups(report)
    rows: list[dict[str, Any]] = []
    for group, scores in report["groups"].items():
        for score, mean in scores.items():
            for set_name in mean["sets"]:
                rows.append(_row(set_name, group, score, report["ood"][set_name][score]))
            rows.append(_row(GROUP_ROW_SET, group, score, mean))
    for set_name, scores in report["ood"].items():
        if set_name not in membership:
            rows.extend(_row(set_name, "", score, values) for score, values in scores.items())
    return rows


def _row(set_name: str, group: str, score: str, values: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "set": set_name,
        "group": group,
        "score": score,
        **{k: values[k] for k in METRIC_KEYS},
        "n": values.get("n", ""),
    }


def _pct(value: float) -> str:
    return f"{100.0 * value:.2f}"


def _display_rows(report: Mapping[str, Any]) -> list[tuple[bool, list[str]]]:
    """``(is_group_mean, cells)`` for the human tables: percentages, group means labelled."""
    out = []
    for row in _rows(report):
        is_mean = row["set"] == GROUP_ROW_SET and bool(row["group"])
        label = f"{row['group']} mean" if is_mean else row["set"]
        cells = [label, row["group"], row["score"], *(_pct(row[k]) for k in METRIC_KEYS), str(row["n"])]
        out.append((is_mean, cells))
    return out


def _id_line(report: Mapping[str, Any]) -> str:
    return f"ID accuracy: {_pct(report['id']['acc'])}% (n = {report['id']['n']})"


def _table_header() -> list[str]:
    return ["set", "group", "score", *(_HEADERS[k] for k in METRIC_KEYS), "n"]


# --------------------------------------------------------------------------------------- formats


def format_table(report: Mapping[str, Any]) -> str:
    """Plain-text table for the terminal: ID accuracy line, then aligned columns in percent."""
    header = _table_header()
    body = [cells for _, cells in _display_rows(report)]
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]
    numeric = set(range(3, len(header)))

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([_id_line(report), line(header), rule, *(line(r) for r in body)])


def _markdown(report: Mapping[str, Any], figures: Sequence[str] = ()) -> str:
    header = _table_header()
    lines = [
        "# OOD evaluation report",
        "",
        f"**{_id_line(report)}**",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
    ]
    for is_mean, cells in _display_rows(report):
        if is_mean:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _LEGEND, ""]
    if figures:  # paths relative to report.md (robustft.callbacks.plots writes them)
        lines += ["## Figures", "", *(f"![{Path(f).stem}]({Path(f).as_posix()})" for f in figures), ""]
    if report.get("meta"):
        lines += ["## Meta", "", "```json", _json(report["meta"]).rstrip(), "```", ""]
    return "\n".join(lines)


def _csv(report: Mapping[str, Any]) -> str:
    """Fractions written with ``repr`` precision so the CSV loses nothing against the JSON."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in _rows(report):
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue()


def _json_default(obj: Any) -> Any:
    """Let provenance carry paths, numpy / torch scalars without the caller converting them."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"report value of type {type(obj).__name__} is not JSON serialisable: {obj!r}")


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default) + "\n"


# --------------------------------------------------------------------------------------- writing


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary sibling + ``os.replace``)."""
    atomic_write_text(path, text)


def check_writable(report_dir: str | os.PathLike[str]) -> Path:
    """Create ``report_dir`` if needed and prove a file can be written there; return it as a Path.

    Call this before a long evaluation so a typo or read-only mount fails immediately.

    Raises:
        ReportDirError: with the directory, the reason and what to change.
    """
    path = Path(report_dir).expanduser()
    fix = "pass a writable directory as report_dir (or fix its permissions / free disk space)"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportDirError(
            f"cannot create report directory '{path}': {err.strerror or err}; {fix}"
        ) from err
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ReportDirError(
            f"report directory '{path}' is not writable: {err.strerror or err}; {fix}"
        ) from err
    return path


def write_report(
    report: Mapping[str, Any], report_dir: str | os.PathLike[str], figures: Sequence[str] = ()
) -> dict[str, Path]:
    """Write ``report.json``, ``report.csv`` and ``report.md`` into ``report_dir`` atomically.
    ``figures``: PNG paths relative to ``report_dir`` that ``report.md`` shows (section "Figures").

    Returns ``{"json": path, "csv": path, "md": path}``. Everything is rendered in memory first, so
    a serialisation error leaves no file behind.
    """
    directory = check_writable(report_dir)
    contents = {"json": _json(report), "csv": _csv(report), "md": _markdown(report, figures)}
    paths = {kind: directory / f"report.{kind}" for kind in contents}
    for kind, text in contents.items():
        _atomic_write(paths[kind], text)
    return paths


# --------------------------------------------------------------------------------------- comparing


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _diff(a: Any, b: Any, where: str, atol: float, out: list[str]) -> None:
    """Append a line per difference between ``a`` and ``b`` found below ``where``."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in a.keys() - b.keys():
            out.append(f"{where}{key}: only in first")
        for key in b.keys() - a.keys():
            out.append(f"{where}{key}: only in second")
        for key in a.keys() & b.keys():
            _diff(a[key], b[key], f"{where}{key}.", atol, out)
        return
    name = where.rstrip(".")
    if _is_int(a) and _is_int(b):
        if a != b:  # counts (n) are exact
            out.append(f"{name}: {a!r} vs {b!r}")
    elif _is_number(a) and _is_number(b):
        if math.isnan(a) or math.isnan(b):
            if not (math.isnan(a) and math.isnan(b)):
                out.append(f"{name}: {a!r} vs {b!r}")
        elif abs(a - b) > atol:
            out.append(f"{name}: {a!r} vs {b!r} (|diff| {abs(a - b):.3g} > atol {atol:g})")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{name}[{i}].", atol, out)
    elif a != b:
        out.append(f"{name}: {a!r} vs {b!r}")


def compare_reports(
    a: Mapping[str, Any], b: Mapping[str, Any], atol: float = 1e-6, *, ignore: Iterable[str] = ("meta",)
) -> list[str]:
    """Differences between two reports, one readable line each; empty when they agree.

    Floats match within ``atol`` (absolute, on fractions); integers (sample counts) and everything
    else must be equal; NaN equals NaN. Top-level keys in ``ignore`` are skipped: by default
    ``meta``, which holds run-specific provenance (timestamps, paths) that a stored expected report
    cannot share.
    """
    skip = set(ignore)
    out: list[str] = []
    _diff(
        {k: v for k, v in a.items() if k not in skip},
        {k: v for k, v in b.items() if k not in skip},
        "",
        atol,
        out,
    )
    return sorted(out)
