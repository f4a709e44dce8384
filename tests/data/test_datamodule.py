"""OODDataModule on the real bundled data: splits, samples, transforms, OOD sets and config errors."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from robustft.backbones.base import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from robustft.data import DataConfigError, DatasetSpec, OODDataModule
from robustft.methods import Classifier

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
JPEG_5K = str(DATA / "cifar10" / "cifar10_train_5k_jpeg.npz")
TEST_2K = str(DATA / "cifar10" / "cifar10_test_2k.npz")
TIN_TEST = str(DATA / "tinyimagenet" / "tin_test_32.npz")
TIN_VAL = str(DATA / "tinyimagenet" / "tin_val_32.npz")
DTD = str(DATA / "dtd" / "dtd_10class_32.npz")
MNIST = str(DATA / "mnist")


def spec(path: str, source: str = "npz", **kwargs) -> DatasetSpec:
    return DatasetSpec(source=source, path=path, **kwargs)


def make_dm(**kwargs) -> OODDataModule:
    kwargs.setdefault("train", spec(JPEG_5K, split="train"))
    kwargs.setdefault("test", spec(TEST_2K))
    return OODDataModule(**kwargs)


@pytest.fixture(scope="module")
def dm() -> OODDataModule:
    module = make_dm(
        ood={
            "near": {"tin": spec(TIN_TEST)},
            "far": {"dtd": spec(DTD), "mnist": spec(MNIST, source="mnist")},
        },
        ood_val={"tin_val": spec(TIN_VAL)},
        batch_size=16,
        eval_batch_size=32,
    )
    module.setup("fit")
    return module


def normalise(raw: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    x = torch.from_numpy(raw).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


# ------------------------------------------------------------------------------------------ splits
def test_val_split_sizes_disjoint_and_covering(dm: OODDataModule) -> None:
    train, val = dm.train_dataset(), dm.val_dataset()
    assert dm.num_classes == 10 and len(dm.class_names) == 10
    assert len(train) == 4500 and len(val) == 500
    train_idx, val_idx = set(train.indices.tolist()), set(val.indices.tolist())
    assert not train_idx & val_idx
    assert train_idx | val_idx == set(range(5000))
    # the reference bank (KNN/MDS/ViM statistics) is the training part with the eval transform
    reference = dm.reference_dataset()
    assert len(reference) == 4500
    for position in (0, 4499):
        raw = dm.train_images.images[train.indices[position]]
        torch.testing.assert_close(reference[position]["image"], normalise(raw), atol=1e-5, rtol=0)
        assert reference[position]["label"] == int(dm.train_images.labels[train.indices[position]])


def test_val_split_is_deterministic(dm: OODDataModule) -> None:
    again = make_dm()
    again.setup("fit")
    np.testing.assert_array_equal(again.val_dataset().indices, dm.val_dataset().indices)
    other = make_dm(seed=1)
    other.setup("fit")
    assert len(other.val_dataset()) == 500
    assert not np.array_equal(other.val_dataset().indices, dm.val_dataset().indices)
    # setup is idempotent: a second call keeps the split
    before = dm.val_dataset().indices.copy()
    dm.setup("test")
    np.testing.assert_array_equal(dm.val_dataset().indices, before)


def test_explicit_val_disables_carving() -> None:
    module = make_dm(val=spec(TEST_2K, max_samples=300), val_fraction=0.5)
    module.setup("fit")
    assert len(module.train_dataset()) == 5000
    assert len(module.val_dataset()) == 300
    assert len(module.val_dataloader().dataset) == 300


def test_val_fraction_zero_gives_no_val() -> None:
    module = make_dm(train=spec(TEST_2K), val_fraction=0.0)
    module.setup("fit")
    assert len(module.train_dataset()) == 2000
    assert module.val_dataset() is None
    assert module.val_dataloader() == []


# ------------------------------------------------------------------------------------------ samples
def test_samples_are_normalised_dicts(dm: OODDataModule) -> None:
    test = dm.test_dataset()
    assert len(test) == 2000
    with np.load(TEST_2K) as arrays:
        raw_images, raw_labels = arrays["images"], arrays["labels"]
    for position in (0, 1234):
        sample = dm.test_dataset()[position]
        assert set(sample) == {"image", "label", "index"}
        assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
        assert sample["label"] == int(raw_labels[position]) and sample["index"] == position
        torch.testing.assert_close(sample["image"], normalise(raw_images[position]), atol=1e-5, rtol=0)

    val = dm.val_dataset()
    sample = val[3]
    raw = dm.train_images.images[val.indices[3]]
    assert sample["index"] == 3  # position inside the dataset, not the source index
    assert sample["label"] == int(dm.train_images.labels[val.indices[3]])
    torch.testing.assert_close(sample["image"], normalise(raw), atol=1e-5, rtol=0)


def test_loaders_batch_dicts(dm: OODDataModule) -> None:
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["label"].shape == (16,)
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch["image"].shape == (32, 3, 32, 32)
    assert test_batch["index"].tolist() == list(range(32))  # evaluation loaders keep order
    val_loader = dm.val_dataloader()
    assert sum(len(b["label"]) for b in val_loader) == 500
    # shuffling of the training loader is seeded by data.seed
    first = next(iter(dm.train_dataloader()))["index"]
    assert torch.equal(first, next(iter(dm.train_dataloader()))["index"])


def test_train_augmentation_is_random_eval_is_deterministic(dm: OODDataModule) -> None:
    train, reference = dm.train_dataset(), dm.reference_dataset()
    torch.manual_seed(0)
    augmented = torch.stack([train[i]["image"] for i in range(8)])
    evaluated = torch.stack([reference[i]["image"] for i in range(8)])
    torch.testing.assert_close(
        evaluated, torch.stack([reference[i]["image"] for i in range(8)]), rtol=0, atol=0
    )
    differing = [not torch.equal(augmented[i], evaluated[i]) for i in range(8)]
    assert sum(differing) >= 4
    torch.manual_seed(1)
    assert not torch.equal(augmented, torch.stack([train[i]["image"] for i in range(8)]))
    # the un-augmented sample equals manual normalisation of the raw pixels
    raw = dm.train_images.images[train.indices[0]]
    torch.testing.assert_close(evaluated[0], normalise(raw), atol=1e-5, rtol=0)


@pytest.mark.parametrize("augmentation", ["none", "random_resized_crop"])
def test_other_augmentations(augmentation: str) -> None:
    module = make_dm(train=spec(TEST_2K, max_samples=16), augmentation=augmentation, val_fraction=0.0)
    module.setup("fit")
    sample = module.train_dataset()[0]["image"]
    assert sample.shape == (3, 32, 32)
    if augmentation == "none":
        torch.testing.assert_close(sample, module.reference_dataset()[0]["image"], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ OOD sets
def test_ood_groups_and_datasets(dm: OODDataModule) -> None:
    assert dm.ood_groups == {"near": ["tin"], "far": ["dtd", "mnist"]}
    test_sets = dm.ood_datasets("test")
    assert list(test_sets) == ["tin", "dtd", "mnist"]
    assert {k: len(v) for k, v in test_sets.items()} == {"tin": 1530, "dtd": 600, "mnist": 2000}
    mnist_sample = test_sets["mnist"][0]
    assert mnist_sample["image"].shape == (3, 32, 32)  # 28x28 grey digits resized and made RGB
    pixels = (
        mnist_sample["image"] * torch.tensor(IMAGENET_STD)[:, None, None]
        + torch.tensor(IMAGENET_MEAN)[:, None, None]
    )
    torch.testing.assert_close(pixels[0], pixels[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[1], pixels[2], atol=1e-5, rtol=0)
    with np.load(DTD) as arrays:
        raw = arrays["images"][5]
    torch.testing.assert_close(test_sets["dtd"][5]["image"], normalise(raw), atol=1e-5, rtol=0)

    val_sets = dm.ood_datasets("val")
    assert list(val_sets) == ["tin_val"] and len(val_sets["tin_val"]) == 200
    with pytest.raises(ValueError, match="'test' or 'val'"):
        dm.ood_datasets("train")


def test_no_ood_sets() -> None:
    module = make_dm(train=spec(TEST_2K, max_samples=20))
    module.setup("fit")
    assert module.ood_groups == {}
    assert module.ood_datasets("test") == {} and module.ood_datasets("val") == {}


def test_bad_ood_path_fails_at_setup(tmp_path: Path) -> None:
    module = make_dm(
        train=spec(TEST_2K, max_samples=20), ood={"far": {"svhn": spec(str(tmp_path / "svhn.npz"))}}
    )
    with pytest.raises(DataConfigError, match=r"data\.ood\.far\.svhn\.path"):
        module.setup("fit")


# ------------------------------------------------------------------------------------------ errors
def test_test_labels_outside_train_label_space() -> None:
    # TinyImageNet labels go up to 199; CIFAR-10 training data has 10 classes
    module = make_dm(train=spec(TEST_2K), test=spec(TIN_TEST))
    with pytest.raises(DataConfigError) as info:
        module.setup("fit")
    message = str(info.value)
    assert message.startswith("data.test") and "data.train has only 10 classes" in message


def test_val_labels_outside_train_label_space() -> None:
    module = make_dm(train=spec(TEST_2K), val=spec(TIN_VAL))
    with pytest.raises(DataConfigError, match=r"^data\.val"):
        module.setup("fit")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"augmentation": "autoaugment"}, "data.augmentation"),
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"val_fraction": -0.1}, "data.val_fraction"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"eval_batch_size": 0}, "data.eval_batch_size: must be >= 1, or null to use data.batch_size; got 0"),
        ({"eval_batch_size": -5}, "data.eval_batch_size: must be >= 1"),
        ({"num_workers": -1}, "data.num_workers: must be >= 0"),
        ({"eval_cache_mb": -1}, "data.eval_cache_mb: must be >= 0"),
    ],
)
def test_bad_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(DataConfigError, match="^" + re.escape(field)):
        make_dm(**kwargs)


def test_ood_set_names_must_not_clash() -> None:
    """Both sets used to be stored as ood/tin: the second was silently dropped."""
    with pytest.raises(DataConfigError) as info:
        make_dm(ood={"near": {"tin": spec(TIN_TEST)}, "far": {"tin": spec(DTD)}})
    message = str(info.value)
    assert message.startswith("data.ood.far.tin: the name 'tin' is already used by data.ood.near.tin")
    assert "Rename one of them" in message
    with pytest.raises(
        DataConfigError, match=r"^data\.ood\.far\.near: .* also a group name \(data\.ood\.near\)"
    ):
        make_dm(ood={"near": {"tin": spec(TIN_TEST)}, "far": {"near": spec(DTD)}})
    with pytest.raises(DataConfigError, match=r"^data\.ood\.far\.mean: .* group-mean rows"):
        make_dm(ood={"far": {"mean": spec(DTD)}})
    # no clash: the same set in two groups is one set counted in both means; ood_val sets live apart
    module = make_dm(
        train=spec(TEST_2K, max_samples=20),
        ood={"near": {"dtd": spec(DTD)}, "far": {"dtd": spec(DTD), "tin": spec(TIN_TEST, max_samples=30)}},
        ood_val={"tin": spec(TIN_VAL, max_samples=10)},
    )
    module.setup("fit")
    assert module.ood_groups == {"near": ["dtd"], "far": ["dtd", "tin"]}
    assert len(module.ood_datasets("test")["tin"]) == 30 and len(module.ood_datasets("val")["tin"]) == 10


@pytest.mark.parametrize(("key", "bad"), [("train", 15), ("train", -1), ("test", -1), ("val", 10)])
def test_id_labels_must_be_train_class_ids(tmp_path: Path, key: str, bad: int) -> None:
    """Train labels were not checked: 15 (or -1) with 10 class names failed at the first training step."""
    path = tmp_path / f"{key}.npz"
    labels = np.array([0, 9, bad, 3])
    names = [f"c{i}" for i in range(10)]
    np.savez(path, images=np.zeros((4, 8, 8, 3), np.uint8), labels=labels, class_names=names)
    kwargs = {"train": spec(TEST_2K, max_samples=20), key: spec(str(path))}
    module = make_dm(**kwargs)
    with pytest.raises(DataConfigError) as info:
        module.setup("fit")
    message = str(info.value)
    assert message.startswith(f"data.{key}: label {bad} in '{path}'")
    if key == "train":
        assert "is not a class id: the set has 10 class names (ids 0..9)" in message
    else:
        assert "data.train has only 10 classes (ids 0..9)" in message


def test_bad_augmentation_lists_choices() -> None:
    with pytest.raises(DataConfigError, match="crop_flip"):
        make_dm(augmentation="flip")


# ------------------------------------------------------------------------------------- preprocessing
def test_preprocess_override() -> None:
    cfg = PreprocessConfig(image_size=40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    module = make_dm(train=spec(TEST_2K, max_samples=8), preprocess=cfg, val_fraction=0.0)
    module.setup("fit")
    assert module.resolve_preprocess() == cfg
    assert module.test_dataset()[0]["image"].shape == (3, 40, 40)
    assert module.train_dataset()[0]["image"].shape == (3, 40, 40)


def test_preprocess_defaults_to_cifar_without_a_model() -> None:
    module = make_dm(train=spec(TEST_2K, max_samples=8))
    assert module.resolve_preprocess().image_size == 32


class _RecordShapes(pl.Callback):
    def __init__(self) -> None:
        self.train_shapes: list[tuple] = []
        self.val_shapes: list[tuple] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train_shapes.append(tuple(batch["image"].shape))
        self.val_sample = trainer.datamodule.val_dataset()[0]["image"]

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_shapes.append(tuple(batch["image"].shape))


def test_preprocess_from_the_attached_models_backbone() -> None:
    """A timm test model expects 160x160 inputs normalised with mean/std 0.5: the datamodule follows it."""
    torch.manual_seed(0)
    model = Classifier(num_classes=10, backbone="timm/test_resnet", scheduler=None)
    assert model.preprocess.image_size == 160
    module = make_dm(
        train=spec(TEST_2K, max_samples=16),
        test=spec(TEST_2K, max_samples=8),
        batch_size=4,
        val_fraction=0.25,
    )
    recorder = _RecordShapes()
    trainer = pl.Trainer(
        fast_dev_run=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(model, datamodule=module)
    assert recorder.train_shapes == [(4, 3, 160, 160)]
    assert recorder.val_shapes == [(4, 3, 160, 160)]
    assert module.resolve_preprocess() == model.preprocess
    # eval transform: 32 -> 160 resize, then (x - 0.5) / 0.5, so values stay in [-1, 1]
    image = recorder.val_sample
    assert image.shape == (3, 160, 160)
    assert image.min() >= -1.0 - 1e-6 and image.max() <= 1.0 + 1e-6
