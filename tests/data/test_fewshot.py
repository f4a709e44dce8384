"""``data.shots_per_class``: K images per class, chosen by the seed alone, disjoint from the validation split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from robustft.data import DataConfigError, DatasetSpec, OODDataModule

REPO = Path(__file__).resolve().parents[2]
TEST_2K = str(REPO / "data" / "cifar10" / "cifar10_test_2k.npz")


def make_dm(**kwargs) -> OODDataModule:
    kwargs.setdefault("train", DatasetSpec(source="npz", path=TEST_2K))
    kwargs.setdefault("test", DatasetSpec(source="npz", path=TEST_2K, max_samples=8))
    module = OODDataModule(**kwargs)
    module.setup("fit")
    return module


def shot_ids(dm: OODDataModule) -> np.ndarray:
    """The source indices of the training images (what the train set actually holds)."""
    return np.asarray(dm.train_dataset().indices)


def test_exactly_k_per_class_and_disjoint_from_validation() -> None:
    dm = make_dm(shots_per_class=4, val_fraction=0.1, shots_seed=3)
    shots = shot_ids(dm)
    labels = dm.train_images.labels
    assert np.bincount(labels[shots], minlength=10).tolist() == [4] * 10
    assert len(set(shots.tolist())) == 40
    train = dm.train_dataset()
    assert np.array_equal(train.labels, labels[shots])
    val = np.asarray(dm.val_dataset().indices)
    assert len(val) == 200  # 10% of the 2000 training images, from the non-shots
    assert not set(val.tolist()) & set(shots.tolist())
    # the KNN / MDS reference bank is the labelled training data too, i.e. the shots
    assert np.array_equal(np.asarray(dm.reference_dataset().labels), labels[shots])


def test_same_seed_same_images_whatever_else_the_method_configures() -> None:
    a = shot_ids(make_dm(shots_per_class=2, shots_seed=5))
    b = shot_ids(make_dm(shots_per_class=2, shots_seed=5, val_fraction=0.3, seed=9, batch_size=7, n_views=2,
                         augmentation="simclr"))
    assert np.array_equal(a, b)
    c = shot_ids(make_dm(shots_per_class=2, shots_seed=6))
    assert not np.array_equal(a, c)
    # shots_seed defaults to the datamodule seed
    assert np.array_equal(shot_ids(make_dm(shots_per_class=2, seed=5)), a)


def test_fewer_shots_are_a_subset_of_more_shots() -> None:
    one = set(shot_ids(make_dm(shots_per_class=1, shots_seed=0)).tolist())
    four = set(shot_ids(make_dm(shots_per_class=4, shots_seed=0)).tolist())
    assert one < four


def test_explicit_val_or_no_val_fraction_carves_nothing() -> None:
    dm = make_dm(shots_per_class=3, val=DatasetSpec(source="npz", path=TEST_2K, max_samples=20))
    assert len(dm.train_dataset()) == 30 and len(dm.val_dataset()) == 20
    dm = make_dm(shots_per_class=3, val_fraction=0.0)
    assert len(dm.train_dataset()) == 30 and dm.val_dataset() is None


def test_more_shots_than_the_smallest_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "imbalanced.npz"
    labels = np.array([0] * 6 + [1] * 2 + [2] * 5)
    np.savez(path, images=np.zeros((len(labels), 8, 8, 3), np.uint8), labels=labels, class_names=["a", "b", "c"])
    spec = DatasetSpec(source="npz", path=str(path))
    make_dm(train=spec, test=spec, shots_per_class=2, val_fraction=0.0)  # the smallest class has exactly 2
    with pytest.raises(DataConfigError) as info:
        make_dm(train=spec, test=spec, shots_per_class=3, val_fraction=0.0)
    message = str(info.value)
    assert message.startswith("data.shots_per_class: 3 shots per class, but class 1 ('b') has only 2 images")
    assert "at most 2" in message and str(path) in message


@pytest.mark.parametrize("bad", [0, -1])
def test_shots_per_class_must_be_positive(bad: int) -> None:
    with pytest.raises(DataConfigError, match=r"^data\.shots_per_class: must be >= 1"):
        OODDataModule(train=DatasetSpec(source="npz", path=TEST_2K), test=DatasetSpec(source="npz", path=TEST_2K),
                      shots_per_class=bad)
