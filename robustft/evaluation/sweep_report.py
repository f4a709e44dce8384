"""The outputs of a WiSE-FT / BANG sweep: ``average.json`` / ``.csv`` / ``.md`` tables and the
``average.png`` plot of accuracy against α. Every file is written atomically (:mod:`robustft.io`): a run
killed mid-write leaves the previous file, never a truncated one."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from robustft.evaluation.sweep import SweepResult
from robustft.io import atomic_write, atomic_write_text

__all__ = ["plot_sweep", "write_sweep"]


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, float) else ("" if value is None else str(value))


def _markdown(result: SweepResult) -> str:
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
    lines += ["", "## Meta", "", "```json", json.dumps(result.meta, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in r.items()})
    return buffer.getvalue()


_COLORS = [(31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194),
           (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (152, 223, 138), (255, 187, 120),
           (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229)]
_HIGHLIGHT = {"ID test": (0, 0, 0), "shifted mean": (214, 39, 40)}


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | Path, size: tuple[int, int] = (760, 480)) -> Path:
    """PNG line plot of ID accuracy and every shifted-set accuracy (and their mean) against α (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont

    series = {"ID test": [r.get("id_acc") for r in rows]}
    for key in _columns(rows):
        if key.startswith("shift/"):
            series[key.removeprefix("shift/")] = [r.get(key) for r in rows]
    if any("shift_mean" in r for r in rows):
        series["shifted mean"] = [r.get("shift_mean") for r in rows]
    alphas = [float(r["alpha"]) for r in rows]
    values = [v for vs in series.values() for v in vs if v is not None]
    lo, hi = min(values), max(values)
    pad = max(0.01, 0.05 * (hi - lo))
    lo, hi = max(0.0, lo - pad), min(1.0, hi + pad)
    if hi <= lo:
        lo, hi = max(0.0, lo - 0.05), min(1.0, hi + 0.05)
    w, h = size
    left, right, top, bottom = 60, 190, 30, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    def xy(a: float, v: float) -> tuple[float, float]:
        x = left + (a - 0.0) / 1.0 * (w - left - right)
        y = h - bottom - (v - lo) / (hi - lo) * (h - top - bottom)
        return x, y

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(6):
        a = i / 5
        x, _ = xy(a, lo)
        draw.line([x, h - bottom, x, h - bottom + 5], fill="black")
        draw.text((x - 8, h - bottom + 8), f"{a:.1f}", fill="black", font=font)
        v = lo + (hi - lo) * i / 5
        _, y = xy(0.0, v)
        draw.line([left - 5, y, left, y], fill="black")
        draw.line([left + 1, y, w - right - 1, y], fill=(230, 230, 230))
        draw.text((8, y - 6), f"{100 * v:.1f}%", fill="black", font=font)
    draw.text(((left + w - right) / 2 - 50, h - 22), "alpha (0 = initial, 1 = fine-tuned)", fill="black", font=font)
    draw.text((left, 8), "accuracy vs alpha (WiSE-FT / BANG)", fill="black", font=font)
    others = iter(_COLORS * (1 + len(series) // len(_COLORS)))
    for i, (name, vs) in enumerate(series.items()):
        color = _HIGHLIGHT.get(name) or next(others)
        points = [xy(a, v) for a, v in zip(alphas, vs, strict=True) if v is not None]
        if len(points) > 1:
            draw.line(points, fill=color, width=4 if name in _HIGHLIGHT else 2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        ly = top + 10 + 16 * i
        draw.line([w - right + 12, ly + 6, w - right + 32, ly + 6], fill=color, width=3)
        draw.text((w - right + 38, ly), name[:24], fill="black", font=font)
    return atomic_write(path, lambda handle: image.save(handle, format="PNG"))


def write_sweep(result: SweepResult, report_dir: str | Path) -> dict[str, Path]:
    """Write ``average.json`` (rows + full per-α reports + meta), ``average.csv``, ``average.md`` and
    ``average.png`` into ``report_dir`` (created if needed), each atomically."""
    from robustft.ood.report import check_writable

    directory = check_writable(report_dir)
    payload = {"rows": result.rows, "reports": result.reports, "meta": result.meta}
    paths = {kind: directory / f"average.{kind}" for kind in ("json", "csv", "md", "png")}
    atomic_write_text(paths["json"], json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write_text(paths["csv"], _csv(result.rows))
    atomic_write_text(paths["md"], _markdown(result))
    plot_sweep(result.rows, paths["png"])
    return paths

