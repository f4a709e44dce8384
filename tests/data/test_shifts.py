"""On-the-fly CIFAR-10-C-style corruptions and shifted ID test sets (real bundled CIFAR-10 images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch

from robustft.backbones.base import PreprocessConfig
from robustft.data import DataConfigError, DatasetSpec, OODDataModule, load_dataset
from robustft.data.shifts import (
    SEVERITY_TABLES,
    CorruptedImages,
    class_projection,
    corrupt,
    gaussian_filter,
    project_logits,
    shifted_test_sets,
)

REPO = Path(__file__).resolve().parents[2]
TEST = str(REPO / "data" / "cifar10" / "cifar10_test_2k.npz")
PNG = str(REPO / "data" / "cifar10" / "cifar10_kaggle_train200_png.npz")


@pytest.fixture(scope="module")
def images():
    return load_dataset(DatasetSpec(source="npz", path=TEST, max_samples=20), "test")


def test_blur_is_skimage_style_gaussian_filter() -> None:
    x = np.random.default_rng(0).random((32, 32, 3))
    for sigma in SEVERITY_TABLES["gaussian_blur"]:
        expected = scipy.ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="nearest", truncate=4.0)
        np.testing.assert_allclose(gaussian_filter(x, sigma), expected, atol=1e-12)


def test_severity_increases_the_shift(images) -> None:
    image = np.asarray(images.load_image(0))
    for name in SEVERITY_TABLES:
        distances = [np.abs(corrupt(image, name, s).astype(float) - image).mean() for s in range(1, 6)]
        assert all(a <= b + 1e-9 for a, b in zip(distances, distances[1:], strict=False)), (name, distances)
        assert distances[0] > 0
    contrast = [corrupt(image, "contrast", s).astype(float).std() for s in (1, 5)]
    assert contrast[1] < 0.3 * contrast[0]  # c = 0.75 vs 0.15


def test_corrupted_images_are_deterministic_per_index(images) -> None:
    a = CorruptedImages(images, "gaussian_noise", 3, seed=0)
    b = CorruptedImages(images, "gaussian_noise", 3, seed=0)
    assert np.array_equal(np.asarray(a.load_image(4)), np.asarray(b.load_image(4)))
    assert not np.array_equal(np.asarray(a.load_image(4)), np.asarray(CorruptedImages(images, "gaussian_noise", 3, seed=1).load_image(4)))
    assert np.array_equal(a.labels, images.labels) and a.class_names == images.class_names


def test_bad_corruptions_are_refused(images) -> None:
    with pytest.raises(DataConfigError, match="unknown corruption 'fog'"):
        CorruptedImages(images, "fog", 1)
    with pytest.raises(DataConfigError, match="1..5"):
        CorruptedImages(images, "contrast", 6)


def test_shifted_test_sets_from_a_datamodule() -> None:
    dm = OODDataModule(
        train={"source": "npz", "path": PNG},
        test={"source": "npz", "path": TEST, "max_samples": 30},
        preprocess=PreprocessConfig(image_size=32),
    )
    dm.setup("test")
    sets = shifted_test_sets(dm, ["gaussian_blur", "contrast"], [1, 5], {"png": {"source": "npz", "path": PNG}})
    assert list(sets) == ["gaussian_blur-1", "gaussian_blur-5", "contrast-1", "contrast-5", "png"]
    assert len(sets["contrast-5"]) == 30 and len(sets["png"]) == 200
    sample = sets["contrast-5"][3]
    assert tuple(sample["image"].shape) == (3, 32, 32) and sample["index"] == 3
    assert sample["label"] == int(load_dataset(DatasetSpec(source="npz", path=TEST, max_samples=30), "t").labels[3])
    with pytest.raises(DataConfigError, match="shifted_sets.tin"):
        shifted_test_sets(dm, [], [3], {"tin": {"source": "npz", "path": str(REPO / "data/tinyimagenet/tin_val_32.npz")}})


def test_class_projection_matches_shifted_classes_to_id_classes_by_name() -> None:
    ids = ["airplane", "automobile", "bird", "cat"]
    assert class_projection(ids, ids, "f") is None
    assert class_projection(["cat", "airplane"], ids, "f") == [3, 0]
    assert class_projection(["bird", "automobile", "airplane", "cat"], ids, "f") == [2, 1, 0, 3]
    assert class_projection(["0", "1"], ids, "f") is None  # unnamed classes: the ID label space
    with pytest.raises(DataConfigError, match="shifted_sets.x: has 5 classes but data.train has only 4"):
        class_projection([str(i) for i in range(5)], ids, "shifted_sets.x")
    with pytest.raises(DataConfigError, match="shifted_sets.x: classes 'goldfish' are not classes of data.train"):
        class_projection(["cat", "goldfish"], ids, "shifted_sets.x")


def test_project_logits_subset_and_full() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [3.0, 0.0, 0.0, 1.0]])
    labels = torch.tensor([1, 0])  # the set's own ids: classes [3, 0] -> "cat", "airplane"
    sub_logits, sub_labels = project_logits(logits, labels, [3, 0], "subset")
    assert torch.equal(sub_logits, torch.tensor([[2.0, 0.0], [1.0, 3.0]])) and torch.equal(sub_labels, labels)
    full_logits, full_labels = project_logits(logits, labels, [3, 0], "full")
    assert torch.equal(full_logits, logits) and torch.equal(full_labels, torch.tensor([0, 3]))
    assert project_logits(logits, labels, None)[0] is logits
    with pytest.raises(ValueError, match="subset or full"):
        project_logits(logits, labels, [3, 0], "top5")
