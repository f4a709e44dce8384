"""Figures a reader can use: ROC curves, ID-vs-OOD score histograms, the WiSE-FT α-sweep and the
leaderboard plots, drawn with matplotlib.

Every ``*_figure`` function is pure: tensors / report dicts in, a :class:`matplotlib.figure.Figure` out,
no Lightning, no file and no global state (figures are built on their own Agg canvas, never through
``pyplot``'s figure manager, so nothing accumulates in a long training process). :func:`save_figure`
writes one as a PNG atomically and closes it.

matplotlib is an optional dependency (the ``plots`` extra: ``pip install 'robustft[plots]'``, which
the README's ``make`` commands install). It is imported on the first figure, not with ``robustft``, so
neither ``import robustft`` nor the CLI start-up pays for it. [CHOICE] When it is missing, calling a
``*_figure`` function raises :class:`PlotsUnavailableError` (an ``ImportError`` naming the extra);
the callers that draw figures as a side product (``OODEvaluation``, ``evaluate``, ``average``) check
:func:`plots_available` instead, skip the figures and warn once, so a report is never lost for a picture.

Conventions match :mod:`robustft.ood.metrics`: scores are "higher = more ID", ID is the positive class
of the ROC curve, ``FPR@95`` is the fraction of OOD samples accepted at the threshold that keeps 95 % of
ID samples. The marked FPR@95 point and the histogram's threshold line are computed so that they equal
the report's ``fpr95`` exactly (tests check it).
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from robustft.ood.metrics import TPR_LEVEL, ScoreArray, ood_metrics, roc_curve_points

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "PlotsUnavailableError",
    "alpha_sweep_figure",
    "auroc_fpr_scatter_figure",
    "figure_file_name",
    "figure_rgb",
    "per_set_bars_figure",
    "plots_available",
    "roc_figure",
    "save_figure",
    "save_png",
    "score_histogram_figure",
    "threshold_at_tpr",
    "warn_plots_unavailable",
]

INSTALL_HINT = "pip install 'robustft[plots]' (or: pip install matplotlib)"
DPI = 100
"""Pixels per inch of every PNG: a 6 x 6 inch ROC figure is 600 x 600 px."""


class PlotsUnavailableError(ImportError):
    """matplotlib, needed to draw figures, is not installed."""


def plots_available() -> bool:
    """Whether matplotlib can be imported (without importing it when it is already loaded)."""
    if "matplotlib" in sys.modules:
        return True
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


_warned = False


def warn_plots_unavailable(what: str = "figures") -> None:
    """Warn, once per process, that ``what`` are skipped because matplotlib is missing."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"{what} skipped: matplotlib is not installed; {INSTALL_HINT}", stacklevel=2)


def _matplotlib() -> Any:
    """Import matplotlib on first use. [CHOICE] Every figure is drawn on its own Agg canvas
    (``FigureCanvasAgg``), so no display is needed and the process-wide ``pyplot`` backend (a notebook's,
    a user script's) is left as it is: nothing here goes through ``pyplot``."""
    try:
        import matplotlib
    except ImportError as err:
        raise PlotsUnavailableError(f"drawing figures needs matplotlib: {INSTALL_HINT}") from err
    return matplotlib


def _new_figure(width: float, height: float, ncols: int = 1, **margins: float) -> tuple[Figure, Any]:
    """A figure on its own Agg canvas with fixed margins (``subplots_adjust`` fractions). [CHOICE] Fixed
    margins rather than constrained layout: the layout solver costs as much as drawing, and fixed
    margins keep every figure of a kind pixel-aligned."""
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=True)
    fig.subplots_adjust(**{"left": 0.12, "right": 0.97, "bottom": 0.12, "top": 0.92, **margins})
    return fig, axes


def _percent_axis(axis: Any, step: float | None = None) -> None:
    """Percent tick labels on round values (every ``step`` or matplotlib's 1-2-2.5-5 steps)."""
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    axis.set_major_locator(MultipleLocator(step) if step else _round_locator())
    axis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{round(100 * value, 6):g}%"))


def _numpy(scores: ScoreArray) -> np.ndarray:
    if isinstance(scores, Tensor):
        return scores.detach().to("cpu", torch.float64).numpy()
    return np.asarray(scores, dtype=np.float64)


# --------------------------------------------------------------------------------------- OOD figures


def threshold_at_tpr(id_scores: ScoreArray, level: float = TPR_LEVEL) -> float:
    """The score threshold (accept as ID when ``score >= t``) that keeps at least ``level`` of the ID
    samples: the ``k``-th largest ID score for the smallest ``k`` with ``k / n >= level``, the same
    float comparison as :func:`robustft.ood.metrics.ood_metrics`. The fraction of OOD scores ``>= t``
    is then the report's ``fpr95``."""
    ids = np.sort(_numpy(id_scores))[::-1]
    if ids.size == 0:
        raise ValueError("threshold_at_tpr: id_scores is empty")
    tpr = np.arange(1, ids.size + 1, dtype=np.float64) / ids.size
    return float(ids[int(np.argmax(tpr >= level))])


def roc_figure(
    id_scores: Mapping[str, ScoreArray], ood_scores: Mapping[str, ScoreArray], set_name: str, id_name: str = "ID"
) -> Figure:
    """ROC curves (ID positive) of every score for one OOD set on one square figure.

    ``id_scores`` / ``ood_scores``: ``{score name: 1-D scores}`` with the same keys (an engine
    ``EvaluationResult``'s ``id_scores`` and ``ood_scores[set_name]``). The legend gives each score's
    AUROC and FPR@95 (exactly the report's values: the same metric code); the FPR@95 point is marked on
    each curve, the 95 % TPR level is a dotted line, the chance diagonal is grey.
    """
    missing = [s for s in ood_scores if s not in id_scores]
    if missing or not ood_scores:
        raise ValueError(f"roc_figure: OOD scores {missing or '{}'} need ID scores of the same names; got {list(id_scores)}")
    fig, ax = _new_figure(6.0, 6.0, left=0.13, right=0.96, bottom=0.10, top=0.94)
    colors = _colors(len(ood_scores))
    ax.plot([0, 1], [0, 1], color="0.75", linewidth=1, linestyle="--", label="chance")
    ax.axhline(TPR_LEVEL, color="0.6", linewidth=0.8, linestyle=":")
    for color, (score, oods) in zip(colors, ood_scores.items(), strict=True):
        ids = id_scores[score]
        metrics = ood_metrics(ids, oods)
        fpr, tpr = (t.cpu().numpy() for t in roc_curve_points(ids, oods))
        ax.plot(fpr, tpr, color=color, linewidth=1.8, drawstyle="default",
                label=f"{score}: AUROC {100 * metrics['auroc']:.2f}%, FPR@95 {100 * metrics['fpr95']:.2f}%")
        # the FPR@95 point: the first ROC vertex at or above 95 % TPR (all vertices, none dropped)
        full_fpr, full_tpr = (t.cpu().numpy() for t in roc_curve_points(ids, oods, drop_intermediate=False))
        i = int(np.argmax(full_tpr >= TPR_LEVEL))
        ax.plot([full_fpr[i]], [full_tpr[i]], marker="o", markersize=7, color=color, markeredgecolor="black",
                linestyle="none", zorder=5)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    _percent_axis(ax.xaxis, 0.2)
    _percent_axis(ax.yaxis, 0.2)
    ax.grid(True, color="0.92", linewidth=0.8)
    ax.set_xlabel(f"FPR: OOD ({set_name}) accepted as ID")
    ax.set_ylabel(f"TPR: {id_name} accepted")
    ax.set_title(f"ROC, {id_name} vs {set_name} (dot: FPR at 95% TPR)")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    return fig


def score_histogram_figure(
    id_scores: ScoreArray, ood_scores: ScoreArray, set_name: str, score: str, bins: int = 60, id_name: str = "ID"
) -> Figure:
    """ID and OOD score densities over shared bins, with the 95 %-TPR threshold as a vertical line.

    Both histograms are normalised to unit area (``density``) so sets of different sizes compare; the
    bins span the pooled scores. The threshold's legend entry gives the FPR@95 it implies.
    """
    ids, oods = _numpy(id_scores), _numpy(ood_scores)
    if ids.size == 0 or oods.size == 0:
        raise ValueError(f"score_histogram_figure: empty scores for {set_name}/{score}")
    if bins < 1:
        raise ValueError(f"score_histogram_figure: bins must be >= 1, got {bins}")
    edges = np.histogram_bin_edges(np.concatenate([ids, oods]), bins=bins)
    threshold = threshold_at_tpr(ids)
    fpr = float((oods >= threshold).mean())
    fig, ax = _new_figure(6.4, 4.0, left=0.11, bottom=0.13, top=0.91)
    for values, color, label in ((ids, "tab:blue", f"{id_name} (n={ids.size})"),
                                 (oods, "tab:orange", f"{set_name} (n={oods.size})")):
        density, _ = np.histogram(values, bins=edges, density=True)
        ax.stairs(density, edges, fill=True, alpha=0.5, color=color, label=label)
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2,
               label=f"95% TPR threshold {threshold:.4g} (FPR {100 * fpr:.2f}%)")
    ax.set_xlabel(f"{score} score (higher = more ID)")
    ax.set_ylabel("density")
    ax.set_title(f"{score}: {id_name} vs {set_name}")
    ax.legend(fontsize=8, framealpha=0.9)
    return fig


# --------------------------------------------------------------------------------------- α sweep


def _sweep_series(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float | None]]:
    """``{"ID test": [...], <each shifted set>: [...], "shifted mean": [...]}`` per row (None = absent)."""
    series: dict[str, list[float | None]] = {"ID test": [r.get("id_acc") for r in rows]}
    for key in dict.fromkeys(k for r in rows for k in r):
        if key.startswith("shift/"):
            series[key.removeprefix("shift/")] = [r.get(key) for r in rows]
    if any(r.get("shift_mean") is not None for r in rows):
        series["shifted mean"] = [r.get("shift_mean") for r in rows]
    return series


def alpha_sweep_figure(rows: Sequence[Mapping[str, Any]], chosen_alpha: float | None = None) -> Figure:
    """The WiSE-FT / BANG sweep: accuracy vs α (left) and ID vs shifted-mean accuracy, one point per α
    (right, WiSE-FT's figure 1).

    ``rows``: the sweep's rows (``alpha``, ``id_acc``, ``shift/<set>`` and ``shift_mean`` fractions, as in
    ``average.json``). ``chosen_alpha``: the saved α, drawn as a vertical line (left) and a star (right).
    The right panel is drawn only when the rows have a shifted mean.
    """
    if not rows:
        raise ValueError("alpha_sweep_figure: no rows")
    alphas = [float(r["alpha"]) for r in rows]
    series = _sweep_series(rows)
    has_shift = "shifted mean" in series
    # two panels: the left one's legend (one entry per shifted set) sits in the gap between them
    fig, axes = _new_figure(14.0 if has_shift else 7.0, 5.0, ncols=2 if has_shift else 1,
                            left=0.055 if has_shift else 0.11, right=0.985, wspace=0.5, bottom=0.11, top=0.93)
    left = axes[0] if has_shift else axes
    others = iter(_colors(max(1, len(series) - 2), skip_highlight=True))
    for name, values in series.items():
        points = [(a, v) for a, v in zip(alphas, values, strict=True) if v is not None]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        if name in ("ID test", "shifted mean"):
            style = {"color": "black" if name == "ID test" else "tab:red", "linewidth": 2.6, "zorder": 4}
        else:
            style = {"color": next(others), "linewidth": 1.3, "alpha": 0.85}
        left.plot(xs, ys, marker="o", markersize=4, label=name, **style)
    if chosen_alpha is not None:
        left.axvline(chosen_alpha, color="0.3", linestyle="--", linewidth=1.2, label=f"chosen α = {chosen_alpha:g}")
    left.set_xlim(min(alphas) - 0.02, max(alphas) + 0.02)
    left.xaxis.set_major_locator(_round_locator())
    _percent_axis(left.yaxis)
    left.grid(True, color="0.92", linewidth=0.8)
    left.set_xlabel("α (0 = initial θ0, 1 = fine-tuned θ1)")
    left.set_ylabel("accuracy")
    left.set_title("accuracy vs α, weights (1-α)·θ0 + α·θ1")
    if has_shift:
        left.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    else:
        left.legend(fontsize=8, framealpha=0.8, loc="best")
    if has_shift:
        _id_vs_shifted(axes[1], alphas, series["ID test"], series["shifted mean"], chosen_alpha)
    return fig


def _id_vs_shifted(ax: Any, alphas: list[float], id_acc: list, shift: list, chosen: float | None) -> None:
    points = [(a, x, y) for a, x, y in zip(alphas, id_acc, shift, strict=True) if x is not None and y is not None]
    if not points:
        return
    a, xs, ys = zip(*points, strict=True)
    ax.plot(xs, ys, color="tab:purple", marker="o", markersize=5, linewidth=1.8, label="weight-space ensemble")
    for alpha, x, y in points:
        ax.annotate(f"α={alpha:g}", (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7)
    ax.plot([xs[0]], [ys[0]], marker="s", markersize=9, color="tab:blue", linestyle="none",
            label=f"α={a[0]:g} (θ0)")
    ax.plot([xs[-1]], [ys[-1]], marker="D", markersize=8, color="tab:green", linestyle="none",
            label=f"α={a[-1]:g} (θ1)")
    if chosen is not None and chosen in a:
        i = a.index(chosen)
        ax.plot([xs[i]], [ys[i]], marker="*", markersize=16, color="gold", markeredgecolor="black",
                linestyle="none", zorder=5, label=f"chosen α = {chosen:g}")
    _percent_axis(ax.xaxis)
    _percent_axis(ax.yaxis)
    ax.margins(0.12)
    ax.grid(True, color="0.92", linewidth=0.8)
    ax.set_xlabel("ID test accuracy")
    ax.set_ylabel("shifted accuracy (mean over shifted sets)")
    ax.set_title("ID vs shifted accuracy (WiSE-FT fig. 1 style)")
    ax.legend(fontsize=8, framealpha=0.9, loc="best")


def _round_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10])


# --------------------------------------------------------------------------------------- leaderboard


def auroc_fpr_scatter_figure(points: Mapping[str, Mapping[str, Mapping[str, float]]]) -> Figure:
    """AUROC vs FPR@95 per method: ``{method: {group or set: {"auroc": x, "fpr95": y}}}`` (fractions),
    e.g. ``{m: report["groups"][g][default_score] for g in ...}``. One colour per method, one marker per
    group / set; the top-left corner is best."""
    if not points:
        raise ValueError("auroc_fpr_scatter_figure: no methods")
    groups = list(dict.fromkeys(g for rows in points.values() for g in rows))
    markers = dict(zip(groups, ["o", "^", "s", "D", "v", "P", "X", "<", ">"] * (1 + len(groups) // 9), strict=False))
    fig, ax = _new_figure(7.0, 5.5, left=0.11)
    for color, rows in zip(_colors(len(points)), points.values(), strict=True):
        for group, values in rows.items():
            ax.plot([values["fpr95"]], [values["auroc"]], marker=markers[group], markersize=8, color=color,
                    markeredgecolor="black", linestyle="none")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", linestyle="none", label=m) for c, m in zip(_colors(len(points)), points, strict=True)]
    handles += [Line2D([], [], color="0.5", marker=markers[g], linestyle="none", label=g) for g in groups]
    _percent_axis(ax.xaxis)
    _percent_axis(ax.yaxis)
    ax.margins(0.08)
    ax.grid(True, color="0.92", linewidth=0.8)
    ax.set_xlabel("FPR@95 (lower is better)")
    ax.set_ylabel("AUROC (higher is better)")
    ax.set_title("OOD detection per method")
    ax.legend(handles=handles, fontsize=8, framealpha=0.9, loc="best")
    return fig


def per_set_bars_figure(values: Mapping[str, Mapping[str, float]], metric: str = "AUROC") -> Figure:
    """Grouped bars: one group per OOD set, one bar per method. ``values``: ``{method: {set: fraction}}``;
    a set a method lacks is left empty. ``metric`` names the y axis."""
    if not values:
        raise ValueError("per_set_bars_figure: no methods")
    sets = list(dict.fromkeys(s for rows in values.values() for s in rows))
    width = 0.8 / len(values)
    fig, ax = _new_figure(max(6.0, 1.2 * len(sets) + 3.0), 4.5, left=0.1)
    x = np.arange(len(sets), dtype=np.float64)
    for i, (color, (method, rows)) in enumerate(zip(_colors(len(values)), values.items(), strict=True)):
        heights = [rows.get(s, np.nan) for s in sets]
        ax.bar(x - 0.4 + width * (i + 0.5), heights, width=width, color=color, label=method)
    ax.set_xticks(x, sets)
    _percent_axis(ax.yaxis)
    ax.grid(True, axis="y", color="0.92", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per OOD set")
    ax.legend(fontsize=8, framealpha=0.9, loc="best")
    return fig


# --------------------------------------------------------------------------------------- files


def _colors(n: int, skip_highlight: bool = False) -> list[Any]:
    """``n`` distinct colours: tab10, then tab20 for more. ``skip_highlight`` leaves out the reds (the
    sweep's "shifted mean" is red, "ID test" black)."""
    import matplotlib

    base = [c for i, c in enumerate(matplotlib.colormaps["tab10"].colors) if not (skip_highlight and i == 3)]
    if n <= len(base):
        return list(base[:n])
    more = [c for i, c in enumerate(matplotlib.colormaps["tab20"].colors) if not (skip_highlight and i in (6, 7))]
    return [more[i % len(more)] for i in range(n)]


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def figure_file_name(*parts: str) -> str:
    """``roc_<set>.png``-style names: parts joined by ``_``, characters unsafe in a file name replaced."""
    return "_".join(_UNSAFE.sub("-", p) for p in parts) + ".png"


def figure_rgb(fig: Figure) -> np.ndarray:
    """Render ``fig`` once on its Agg canvas: an ``[H, W, 3]`` uint8 array (what TensorBoard's
    ``add_figure`` logs, and what :func:`save_figure` writes)."""
    canvas = fig.canvas
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3]


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an ``[H, W, 3]`` uint8 image as a PNG atomically. PIL writes no timestamp or version, so the
    same pixels give the same bytes."""
    from PIL import Image

    from robustft.io import atomic_write

    return atomic_write(path, lambda handle: Image.fromarray(rgb, mode="RGB").save(handle, format="PNG"))


def save_figure(fig: Figure, path: str | Path, close: bool = True) -> Path:
    """Render ``fig`` (:func:`figure_rgb`) and write it as a PNG atomically; the same figure gives the
    same bytes. Returns the path."""
    out = save_png(figure_rgb(fig), path)
    if close:
        close_figure(fig)
    return out


def close_figure(fig: Figure) -> None:
    """Free a figure built here (it has no pyplot manager: dropping the reference is enough, but clear
    it so a caller holding it does not keep the artists alive)."""
    fig.clear()
