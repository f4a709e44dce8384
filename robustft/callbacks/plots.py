"""The figures of one evaluation, beside its report and in TensorBoard.

:func:`write_result_figures` turns an engine :class:`~robustft.evaluation.engine.EvaluationResult` into
``figures/roc_<set>.png`` (every score on one ROC figure) and ``figures/hist_<set>_<score>.png`` (ID vs
OOD score densities) under the report folder, and logs the same figures to each TensorBoard writer given
(the rendered figure, as ``add_figure`` logs it; tags ``figures/roc/<set>`` and ``figures/hist/<set>/<score>``) with the raw scores as
TensorBoard histograms (``scores/id/<score>``, ``scores/<set>/<score>``). The drawing itself is :mod:`robustft.plots`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustft.evaluation.engine import EvaluationResult
from robustft.plots import (
    close_figure,
    figure_file_name,
    figure_rgb,
    plots_available,
    roc_figure,
    save_png,
    score_histogram_figure,
    warn_plots_unavailable,
)

FIGURES_DIR = "figures"
"""Sub-folder of the report folder that holds the PNGs; ``report.md`` links them relative to itself."""


def write_result_figures(
    result: EvaluationResult, report_dir: str | Path, writers: Sequence[Any] = (), step: int = 0
) -> list[str]:
    """Draw, save and log the ROC and histogram figures of ``result``.

    Args:
        result: an evaluation with its per-sample scores.
        report_dir: the report folder; PNGs go to its ``figures/`` sub-folder.
        writers: TensorBoard ``SummaryWriter`` s (``TensorBoardLogger.experiment``) to log to.
        step: the global step the TensorBoard entries are logged at.

    Returns:
        The PNG paths relative to ``report_dir`` (``figures/roc_tin.png``, ...), ROC figures first; empty
        (after one warning per process) when matplotlib is not installed.
    """
    if not plots_available():
        warn_plots_unavailable("OOD figures (ROC curves, score histograms)")
        return []
    directory = Path(report_dir)
    written: list[str] = []
    for set_name, ood in result.ood_scores.items():
        name = f"{FIGURES_DIR}/{figure_file_name('roc', set_name)}"
        _emit(roc_figure(result.id_scores, ood, set_name), directory / name, writers, f"figures/roc/{set_name}", step)
        written.append(name)
    for set_name, ood in result.ood_scores.items():
        for score, scores in ood.items():
            name = f"{FIGURES_DIR}/{figure_file_name('hist', set_name, score)}"
            figure = score_histogram_figure(result.id_scores[score], scores, set_name, score)
            _emit(figure, directory / name, writers, f"figures/hist/{set_name}/{score}", step)
            written.append(name)
            for writer in writers:
                writer.add_histogram(f"scores/{set_name}/{score}", scores.float().cpu(), step)
    for writer in writers:
        for score, scores in result.id_scores.items():
            writer.add_histogram(f"scores/id/{score}", scores.float().cpu(), step)
    return written


def _emit(figure: Any, path: Path, writers: Sequence[Any], tag: str, step: int) -> None:
    """Render once; the PNG and the TensorBoard image are the same pixels. (``SummaryWriter.add_figure``
    is exactly ``figure_to_image`` + ``add_image``; calling it would render the figure a second time.)"""
    rgb = figure_rgb(figure)
    close_figure(figure)
    save_png(rgb, path)
    for writer in writers:
        writer.add_image(tag, rgb, step, dataformats="HWC")
