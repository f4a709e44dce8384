"""Score histograms and ROC curves for TensorBoard, drawn without a plotting library."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from robustft.ood.metrics import roc_curve_points


def roc_image(id_scores: Tensor, ood_scores: Tensor, title: str, size: int = 240) -> np.ndarray:
    """An RGB ``[H, W, 3]`` uint8 picture of the ROC curve (ID positive) with the chance diagonal."""
    fpr, tpr = roc_curve_points(id_scores, ood_scores)
    margin = 24
    side = size - 2 * margin
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, margin, margin + side, margin + side], outline="black")
    draw.line([margin, margin + side, margin + side, margin], fill=(180, 180, 180))
    points = [(margin + float(x) * side, margin + side - float(y) * side) for x, y in zip(fpr, tpr, strict=True)]
    draw.line(points, fill=(31, 119, 180), width=2)
    draw.text((margin, 4), title[:40], fill="black")
    draw.text((margin, margin + side + 6), "FPR (OOD accepted)", fill="black")
    return np.asarray(image)


def log_score_plots(experiment, tag: str, id_scores: Tensor, ood_scores: Tensor, step: int) -> None:
    """Histograms of ID and OOD scores plus the ROC image under ``tag`` on a TensorBoard writer."""
    experiment.add_histogram(f"{tag}/id", id_scores.float().cpu(), step)
    experiment.add_histogram(f"{tag}/ood", ood_scores.float().cpu(), step)
    experiment.add_image(f"{tag}/roc", roc_image(id_scores, ood_scores, tag), step, dataformats="HWC")
