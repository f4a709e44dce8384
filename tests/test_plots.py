"""Figures (robustft.plots and the callback that writes them): checked on their matplotlib artists, not pixels.

Each drawn quantity is compared with an independent computation (the report's metrics, numpy histograms,
a brute-force threshold), so a figure that showed the wrong curve, bins or threshold would fail."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from robustft import plots
from robustft.callbacks import OODEvaluation
from robustft.callbacks import ood_eval as ood_eval_module
from robustft.callbacks.plots import write_result_figures
from robustft.data import DatasetSpec, OODDataModule
from robustft.evaluation.engine import EvaluationResult
from robustft.evaluation.sweep_report import plot_sweep
from robustft.methods import Classifier
from robustft.ood.metrics import ood_metrics, roc_curve_points

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


def _scores(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = {"msp": torch.randn(500, generator=g) + 1.5, "energy": torch.randn(500, generator=g).round(decimals=1) + 0.7}
    oods = {"msp": torch.randn(300, generator=g), "energy": torch.randn(300, generator=g).round(decimals=1)}
    return ids, oods


def test_roc_figure_draws_every_score_with_its_report_metrics() -> None:
    ids, oods = _scores()
    fig = plots.roc_figure(ids, oods, "tin")
    (ax,) = fig.axes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == "chance" and len(legend) == 3
    lines = {line.get_label(): line for line in ax.get_lines()}
    for score, label in zip(("msp", "energy"), legend[1:], strict=True):
        metrics = ood_metrics(ids[score], oods[score])
        assert label == f"{score}: AUROC {100 * metrics['auroc']:.2f}%, FPR@95 {100 * metrics['fpr95']:.2f}%"
        fpr, tpr = roc_curve_points(ids[score], oods[score])
        np.testing.assert_array_equal(lines[label].get_xdata(), fpr.numpy())
        np.testing.assert_array_equal(lines[label].get_ydata(), tpr.numpy())
    # the marked FPR@95 points: same colour as their curve, x exactly the report's fpr95, y the first TPR >= 95%
    marks = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert len(marks) == 2
    for mark, score in zip(marks, ("msp", "energy"), strict=True):
        assert mark.get_xdata()[0] == ood_metrics(ids[score], oods[score])["fpr95"]
        assert 0.95 <= mark.get_ydata()[0] < 0.95 + 1 / 500 + 1e-12
    assert ax.get_aspect() == 1.0  # square
    fig.canvas.draw()
    shown = [(tick, label.get_text()) for tick, label in zip(ax.get_xticks(), ax.get_xticklabels(), strict=True)
             if -0.01 <= tick <= 1.01]  # round ticks, as percentages
    assert shown == [(pytest.approx(v / 100), f"{v}%") for v in (0, 20, 40, 60, 80, 100)]
    with pytest.raises(ValueError, match="need ID scores"):
        plots.roc_figure({"msp": ids["msp"]}, oods, "tin")


def test_histogram_shares_bins_shows_densities_and_the_95_tpr_threshold() -> None:
    ids, oods = _scores()
    fig = plots.score_histogram_figure(ids["energy"], oods["energy"], "dtd", "energy", bins=40)
    (ax,) = fig.axes
    (id_patch, ood_patch) = ax.patches
    id_density, id_edges, _ = id_patch.get_data()
    ood_density, ood_edges, _ = ood_patch.get_data()
    np.testing.assert_array_equal(id_edges, ood_edges)  # shared bins over the pooled scores
    pooled = torch.cat([ids["energy"], oods["energy"]]).double()
    assert len(id_edges) == 41 and id_edges[0] == pooled.min().item() and id_edges[-1] == pooled.max().item()
    assert float((id_density * np.diff(id_edges)).sum()) == pytest.approx(1.0)  # densities, not counts
    assert float((ood_density * np.diff(ood_edges)).sum()) == pytest.approx(1.0)
    (threshold_line,) = [line for line in ax.get_lines() if "threshold" in line.get_label()]
    t = threshold_line.get_xdata()[0]
    # brute force: the largest ID score that still accepts >= 95% of ID samples
    candidates = [s for s in ids["energy"].tolist() if (ids["energy"] >= s).double().mean() >= 0.95]
    assert t == max(candidates)
    fpr95 = ood_metrics(ids["energy"], oods["energy"])["fpr95"]
    assert float((oods["energy"] >= t).double().mean()) == pytest.approx(fpr95, abs=1e-12)
    assert f"FPR {100 * fpr95:.2f}%" in threshold_line.get_label()
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels[:2] == ["ID (n=500)", "dtd (n=300)"]


ROWS = [
    {"alpha": 0.0, "id_acc": 0.80, "shift/noise-3": 0.50, "shift/png": 0.90, "shift_mean": 0.70},
    {"alpha": 0.5, "id_acc": 0.86, "shift/noise-3": 0.58, "shift/png": 0.91, "shift_mean": 0.745},
    {"alpha": 1.0, "id_acc": 0.88, "shift/noise-3": 0.52, "shift/png": 0.92, "shift_mean": 0.72},
]


def test_alpha_sweep_figure_has_both_panels_and_marks_the_chosen_alpha() -> None:
    fig = plots.alpha_sweep_figure(ROWS, chosen_alpha=0.5)
    left, right = fig.axes
    lines = {line.get_label(): line for line in left.get_lines()}
    assert set(lines) == {"ID test", "noise-3", "png", "shifted mean", "chosen α = 0.5"}
    assert list(lines["shifted mean"].get_ydata()) == [0.70, 0.745, 0.72]
    assert list(lines["noise-3"].get_xdata()) == [0.0, 0.5, 1.0]
    assert list(lines["chosen α = 0.5"].get_xdata()) == [0.5, 0.5]
    right_lines = {line.get_label(): line for line in right.get_lines()}
    curve = right_lines["weight-space ensemble"]
    assert list(curve.get_xdata()) == [0.80, 0.86, 0.88] and list(curve.get_ydata()) == [0.70, 0.745, 0.72]
    star = right_lines["chosen α = 0.5"]
    assert (star.get_xdata()[0], star.get_ydata()[0], star.get_marker()) == (0.86, 0.745, "*")
    assert right.get_xlabel() == "ID test accuracy"
    # without shifted sets there is one panel
    assert len(plots.alpha_sweep_figure([{"alpha": 0.0, "id_acc": 0.8}, {"alpha": 1.0, "id_acc": 0.9}]).axes) == 1


def test_leaderboard_figures() -> None:
    scatter = plots.auroc_fpr_scatter_figure({
        "CE": {"near": {"auroc": 0.8, "fpr95": 0.6}, "far": {"auroc": 0.9, "fpr95": 0.4}},
        "PALM": {"near": {"auroc": 0.85, "fpr95": 0.5}},
    })
    (ax,) = scatter.axes
    points = sorted((line.get_xdata()[0], line.get_ydata()[0], line.get_marker()) for line in ax.get_lines())
    assert points == [(0.4, 0.9, "^"), (0.5, 0.85, "o"), (0.6, 0.8, "o")]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["CE", "PALM", "near", "far"]
    bars = plots.per_set_bars_figure({"CE": {"tin": 0.8, "dtd": 0.9}, "PALM": {"tin": 0.85, "mnist": 0.95}})
    (ax,) = bars.axes
    heights = {c.get_label(): [p.get_height() for p in c] for c in ax.containers}
    assert heights["CE"][:2] == [0.8, 0.9] and np.isnan(heights["CE"][2])
    assert heights["PALM"][0] == 0.85 and heights["PALM"][2] == 0.95
    assert [t.get_text() for t in ax.get_xticklabels()] == ["tin", "dtd", "mnist"]


def test_pngs_are_deterministic_and_small(tmp_path: Path) -> None:
    ids, oods = _scores()
    sizes = []
    for i in range(2):
        path = plots.save_figure(plots.roc_figure(ids, oods, "tin"), tmp_path / f"roc{i}.png")
        sizes.append(path.stat().st_size)
    assert (tmp_path / "roc0.png").read_bytes() == (tmp_path / "roc1.png").read_bytes()
    sweep = plot_sweep(ROWS, tmp_path / "average.png", chosen_alpha=0.5)
    assert max(sizes[0], sweep.stat().st_size) < 200_000
    assert plots.figure_file_name("hist", "ImageNet-O/val", "msp") == "hist_ImageNet-O-val_msp.png"


def test_missing_matplotlib_skips_figures_with_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, oods = _scores()
    result = EvaluationResult(report={}, id_scores=ids, ood_scores={"tin": oods})
    monkeypatch.setattr(sys.modules["robustft.callbacks.plots"], "plots_available", lambda: False)
    monkeypatch.setattr(plots, "_warned", False)
    with pytest.warns(UserWarning, match=r"robustft\[plots\]"):
        assert write_result_figures(result, tmp_path) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no warning
        assert write_result_figures(result, tmp_path) == []
    assert not (tmp_path / "figures").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # a direct call names the extra
    with pytest.raises(plots.PlotsUnavailableError, match=r"robustft\[plots\]"):
        plots.roc_figure(ids, oods, "tin")


# --------------------------------------------------------------------------------------- the callback


@pytest.fixture(scope="module")
def datamodule() -> OODDataModule:
    def spec(path: Path, source: str = "npz", n: int = 80) -> DatasetSpec:
        return DatasetSpec(source=source, path=str(path), max_samples=n)

    dm = OODDataModule(
        train=spec(DATA / "cifar10" / "cifar10_train_5k_jpeg.npz", n=64),
        test=spec(DATA / "cifar10" / "cifar10_test_2k.npz", n=120),
        ood={"near": {"tin": spec(DATA / "tinyimagenet" / "tin_test_32.npz")},
             "far": {"dtd": spec(DATA / "dtd" / "dtd_10class_32.npz")}},
        batch_size=32,
        eval_batch_size=200,
    )
    dm.setup("fit")
    return dm


def _model() -> Classifier:
    torch.manual_seed(0)
    weights = str(DATA / "weights" / "resnet20-12fca82f.th")
    return Classifier(num_classes=10, backbone="cifar_resnet20", backbone_weights=weights, scores=["msp", "energy"])


def _trainer(tmp_path: Path, callback: OODEvaluation, epochs: int = 1) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_epochs=epochs, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
        logger=TensorBoardLogger(str(tmp_path), name="tb", version=""), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )


def _event_tags(log_dir: Path) -> tuple[dict[str, list[int]], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    images = {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}
    first = events.Images("figures/roc/tin")[0] if "figures/roc/tin" in images else None
    assert first is None or first.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    return images, events.Tags()["histograms"]


def test_test_writes_the_figures_links_them_and_logs_them_to_tensorboard(datamodule, tmp_path: Path) -> None:
    """``test`` (what ``evaluate`` runs) draws every figure once, beside the report and in TensorBoard."""
    callback = OODEvaluation(every_n_epochs=0, report_dir=str(tmp_path / "report"))
    trainer = _trainer(tmp_path, callback)
    trainer.test(_model(), datamodule=datamodule, verbose=False)
    expected = ["figures/roc_tin.png", "figures/roc_dtd.png", "figures/hist_tin_msp.png", "figures/hist_tin_energy.png",
                "figures/hist_dtd_msp.png", "figures/hist_dtd_energy.png"]
    markdown = (tmp_path / "report" / "report.md").read_text()
    for name in expected:
        png = tmp_path / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
        assert f"]({name})" in markdown  # linked relative to report.md
    assert sorted(p.name for p in (tmp_path / "report" / "figures").iterdir()) == sorted(Path(n).name for n in expected)
    images, histograms = _event_tags(tmp_path / "tb")
    assert set(images) == {"figures/roc/tin", "figures/roc/dtd", "figures/hist/tin/msp", "figures/hist/tin/energy",
                           "figures/hist/dtd/msp", "figures/hist/dtd/energy"}
    assert {"scores/id/msp", "scores/tin/energy", "scores/dtd/msp"} <= set(histograms)


def test_fit_draws_figures_once_at_the_end_by_default(datamodule, tmp_path: Path, monkeypatch) -> None:
    """Per-epoch evaluations draw nothing by default (their budget is the overhead benchmark's); the last
    one is drawn once at the end of fit. ``plots_every_n_evaluations: 1`` draws every evaluation."""
    calls: list[int] = []
    original = ood_eval_module.write_result_figures

    def counting(result, directory, writers, step):
        calls.append(step)
        return original(result, directory, writers, step)

    monkeypatch.setattr(ood_eval_module, "write_result_figures", counting)
    callback = OODEvaluation(every_n_epochs=1, report_dir=str(tmp_path / "a"), plots_every_n_evaluations=0)
    _trainer(tmp_path / "a", callback, epochs=2).fit(_model(), datamodule=datamodule)
    assert calls == [2]  # once, after the last epoch's evaluation, at the final step
    assert "](figures/roc_tin.png)" in (tmp_path / "a" / "report.md").read_text()
    calls.clear()
    callback = OODEvaluation(every_n_epochs=1, report_dir=str(tmp_path / "b"), plots_every_n_evaluations=1)
    _trainer(tmp_path / "b", callback, epochs=2).fit(_model(), datamodule=datamodule)
    assert calls == [1, 2]  # every evaluation, and nothing redrawn at the end
    images, _ = _event_tags(tmp_path / "b" / "tb")
    assert images["figures/roc/dtd"] == [1, 2]
    with pytest.raises(ValueError, match="plots_every_n_evaluations"):
        OODEvaluation(plots_every_n_evaluations=-1)


def test_report_json_is_unchanged_by_figures(tmp_path: Path) -> None:
    """report.md gains a Figures section; report.json does not carry the figure list."""
    from robustft.ood.report import write_report

    report = {"id": {"acc": 0.9, "n": 10}, "ood": {}, "groups": {}, "meta": {}}
    paths = write_report(report, tmp_path, figures=["figures/roc_tin.png"])
    assert json.loads(paths["json"].read_text()) == report
    assert "## Figures" in paths["md"].read_text() and "![roc_tin](figures/roc_tin.png)" in paths["md"].read_text()
    assert "## Figures" not in write_report(report, tmp_path / "none")["md"].read_text()
