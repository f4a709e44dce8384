"""Named training transforms (the registry behind ``data.augmentation``) and ``data.n_views``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import transforms as T

from robustft.backbones.base import PreprocessConfig
from robustft.data import DataConfigError, DatasetSpec, IndexedDataset, OODDataModule, load_dataset
from robustft.data.transforms import TRAIN_TRANSFORMS, train_transform

REPO = Path(__file__).resolve().parents[2]
TEST_2K = str(REPO / "data" / "cifar10" / "cifar10_test_2k.npz")
CFG = PreprocessConfig(image_size=32)


def make_dm(**kwargs) -> OODDataModule:
    kwargs.setdefault("train", DatasetSpec(source="npz", path=TEST_2K, max_samples=40))
    kwargs.setdefault("test", DatasetSpec(source="npz", path=TEST_2K, max_samples=8))
    module = OODDataModule(**kwargs)
    module.setup("fit")
    return module


def test_registry_names_and_each_recipe_builds_a_valid_transform() -> None:
    assert {"none", "crop_flip", "random_resized_crop", "simclr"} <= set(TRAIN_TRANSFORMS.names())
    image = load_dataset(DatasetSpec(source="npz", path=TEST_2K, max_samples=1), "data.train")[0][0]
    for name in TRAIN_TRANSFORMS:
        out = train_transform(CFG, name)(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32, name


@pytest.mark.parametrize(("typo", "close"), [("simclrr", "simclr"), ("cropflip", "crop_flip"), ("flip", "crop_flip")])
def test_unknown_augmentation_names_the_field_and_the_close_match(typo: str, close: str) -> None:
    with pytest.raises(DataConfigError) as info:
        OODDataModule(train=DatasetSpec(source="npz", path=TEST_2K), test=DatasetSpec(source="npz", path=TEST_2K),
                      augmentation=typo)
    message = str(info.value)
    assert message.startswith(f"data.augmentation: Unknown training transform '{typo}'")
    assert f"Did you mean '{close}'" in message and "simclr" in message


def test_simclr_is_palms_recipe() -> None:
    """RandomResizedCrop(scale 0.2-1) + flip + ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8 + RandomGrayscale(0.2)."""
    steps = train_transform(CFG, "simclr").transforms
    crop, flip, jitter, gray = steps[:4]
    assert isinstance(crop, T.RandomResizedCrop) and crop.scale == (0.2, 1.0) and crop.size == (32, 32)
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(jitter, T.RandomApply) and jitter.p == 0.8
    (cj,) = jitter.transforms
    assert isinstance(cj, T.ColorJitter)
    assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
    assert isinstance(gray, T.RandomGrayscale) and gray.p == 0.2
    assert isinstance(steps[-1], T.Normalize) and tuple(steps[-1].mean) == tuple(CFG.mean)


def test_simclr_draws_grayscale_and_colour_jitter_at_their_rates() -> None:
    image = load_dataset(DatasetSpec(source="npz", path=TEST_2K, max_samples=1), "data.train")[0][0]
    cfg = PreprocessConfig(image_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    transform = train_transform(cfg, "simclr")
    torch.manual_seed(0)
    outs = torch.stack([transform(image) for _ in range(300)])
    gray = ((outs[:, 0] - outs[:, 1]).abs().amax((1, 2)) < 1e-6) & ((outs[:, 1] - outs[:, 2]).abs().amax((1, 2)) < 1e-6)
    assert 0.12 < gray.float().mean() < 0.28  # p = 0.2
    assert len({round(float(o.mean()), 4) for o in outs}) > 250  # crops and jitter make nearly every view differ


# ------------------------------------------------------------------------------------------ n_views
def test_n_views_are_independent_transform_draws_of_the_same_image() -> None:
    dm = make_dm(n_views=3, augmentation="crop_flip", val_fraction=0.0)
    dataset = dm.train_dataset()
    one_view = IndexedDataset(dm.train_images, train_transform(dm.resolve_preprocess(), "crop_flip"))
    for position in (0, 7):
        torch.manual_seed(position)
        sample = dataset[position]
        assert sample["image"].shape == (3, 3, 32, 32)
        assert sample["label"] == int(dm.train_images.labels[position]) and sample["index"] == position
        views = sample["image"]
        assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
        # view v is exactly the v-th draw of the one-view training transform on this very image
        torch.manual_seed(position)
        expected = torch.stack([one_view[position]["image"] for _ in range(3)])
        assert torch.equal(views, expected)


def test_n_views_batch_layout_and_evaluation_unchanged() -> None:
    dm = make_dm(n_views=2, augmentation="simclr", batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "index"}
    assert batch["image"].shape == (4, 2, 3, 32, 32) and batch["label"].shape == (4,) and batch["index"].shape == (4,)
    evaluation = next(iter(dm.test_dataloader()))
    assert evaluation["image"].shape == (4, 3, 32, 32)
    assert dm.val_dataset()[0]["image"].shape == (3, 32, 32)


def test_one_view_is_exactly_todays_batch() -> None:
    """n_views: 1 draws what the training loader drew before the option existed."""
    dm = make_dm(batch_size=8)
    torch.manual_seed(0)
    batches = [(b["image"].clone(), b["label"], b["index"]) for b in dm.train_dataloader()]
    plain = IndexedDataset(dm.train_images, train_transform(dm.resolve_preprocess(), "crop_flip"), dm._train_indices)
    loader = DataLoader(plain, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(dm.seed))
    torch.manual_seed(0)
    for (image, label, index), expected in zip(batches, loader, strict=True):
        assert image.shape[1:] == (3, 32, 32)
        assert torch.equal(image, expected["image"]) and torch.equal(label, expected["label"])
        assert torch.equal(index, expected["index"])


@pytest.mark.parametrize("bad", [0, -2])
def test_n_views_must_be_positive(bad: int) -> None:
    with pytest.raises(DataConfigError, match=r"^data\.n_views: must be >= 1"):
        OODDataModule(train=DatasetSpec(source="npz", path=TEST_2K), test=DatasetSpec(source="npz", path=TEST_2K),
                      n_views=bad)


def test_views_keep_the_source_captions(tmp_path: Path) -> None:
    path = tmp_path / "captioned.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8), labels=np.arange(6) % 2,
             class_names=["a", "b"], texts=np.array([f"caption {i}" for i in range(6)]))
    captioned = DatasetSpec(source="npz", path=str(path))
    dm = make_dm(train=captioned, test=captioned, val_fraction=0.0, n_views=2, batch_size=6)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (6, 2, 3, 32, 32)
    assert batch["text"] == [f"caption {i}" for i in batch["index"].tolist()]
