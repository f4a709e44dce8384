"""The outputs of a WiSE-FT / BANG sweep: ``average.json`` / ``.csv`` / ``.md`` tables and the
``average.png`` figure (accuracy against α, and ID against shifted accuracy per α; matplotlib, the ``plots``
extra). Every file is written atomically (:mod:`robustft.io`): a run
killed mid-write leaves the previous file, never a truncated one."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from robustft.evaluation.sweep import SweepResult
from robustft.io import atomic_write_text
from robustft.plots import plots_available, warn_plots_unavailable

__all__ = ["plot_sweep", "write_sweep"]


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, float) else ("" if value is None else str(value))


def _markdown(result: SweepResult, with_figure: bool = False) -> str:
    rows = result.rows
    cols = _columns(rows)
    shown = [c for c in cols if c not in ("score", "val_nll", "val_logit_norm")]
    titles = {
        "alpha": "α",
        "id_acc": "ID acc",
        "val_acc": "val acc",
        "val_msp": "val mean MSP",
        "id_msp": "ID mean MSP",
        "shift_mean": "shifted mean",
    }
    score = next((r["score"] for r in rows if "score" in r), None)
    header = [titles.get(c, c.replace("shift/", "").replace("auroc/", f"AUROC {score} ")) for c in shown]
    lines = [
        "# Weight-space ensemble sweep (WiSE-FT / BANG)",
        "",
        "Accuracies, mean max-softmax (MSP) and AUROC in percent; shifted columns are ID-labelled shifted sets.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---:"] * len(header)) + "|",
    ]
    for r in rows:
        cells = [f"{r['alpha']:g}" if c == "alpha" else _pct(r.get(c)) for c in shown]
        if result.chosen_alpha is not None and r["alpha"] == result.chosen_alpha:
            cells[0] = f"**{cells[0]}** (saved)"
        lines.append("| " + " | ".join(cells) + " |")
    if with_figure:
        lines += ["", "![accuracy vs α and ID vs shifted accuracy](average.png)"]
    lines += ["", "## Meta", "", "```json", json.dumps(result.meta, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in r.items()})
    return buffer.getvalue()


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | Path, chosen_alpha: float | None = None) -> Path:
    """``average.png``: accuracy vs α and ID vs shifted accuracy per α (:func:`robustft.plots.alpha_sweep_figure`),
    written atomically. Raises :class:`robustft.plots.PlotsUnavailableError` without matplotlib."""
    from robustft.plots import alpha_sweep_figure, save_figure

    return save_figure(alpha_sweep_figure(rows, chosen_alpha), path)


def write_sweep(result: SweepResult, report_dir: str | Path) -> dict[str, Path]:
    """Write ``average.json`` (rows + full per-α reports + meta), ``average.csv``, ``average.md`` and
    ``average.png`` into ``report_dir`` (created if needed), each atomically."""
    from robustft.ood.report import check_writable

    directory = check_writable(report_dir)
    payload = {"rows": result.rows, "reports": result.reports, "meta": result.meta}
    paths = {kind: directory / f"average.{kind}" for kind in ("json", "csv", "md", "png")}
    if plots_available():
        plot_sweep(result.rows, paths["png"], result.chosen_alpha)
    else:
        warn_plots_unavailable("average.png")
        del paths["png"]
    atomic_write_text(paths["json"], json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write_text(paths["csv"], _csv(result.rows))
    atomic_write_text(paths["md"], _markdown(result, with_figure="png" in paths))
    return paths

