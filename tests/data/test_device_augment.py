"""Device-side augmentation (``data.device_augmentation``), on CPU tensors (no GPU in CI).

Each crop is checked against torchvision's own pad + crop + flip at the drawn offsets, the offsets'
distribution against what torchvision's ``RandomCrop`` + ``RandomHorizontalFlip`` draw (recovered from
its outputs), the normalisation and the once-decoded uint8 set against the CPU transforms, and a short
``fit`` with the option lowers the training loss.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision import transforms as T

from robustft.backbones.base import PreprocessConfig
from robustft.data import DataConfigError, DatasetSpec, OODDataModule
from robustft.data.datamodule import IndexedDataset
from robustft.data.device_augment import (
    ChannelsLast,
    UInt8TrainingSet,
    augment_batch,
    crop_flip_at,
    draw_crop_flip,
    normalize_uint8,
)
from robustft.data.transforms import eval_transform
from robustft.methods.classifier import Classifier

DATA = Path(__file__).resolve().parents[2] / "data"
JPEG_5K = str(DATA / "cifar10" / "cifar10_train_5k_jpeg.npz")
TEST_2K = str(DATA / "cifar10" / "cifar10_test_2k.npz")
CIFAR = PreprocessConfig(image_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261))


def _images(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_each_crop_is_torchvisions_pad_crop_flip_at_the_drawn_offsets() -> None:
    images = _images()
    top, left, flip = draw_crop_flip(len(images), 4, torch.Generator().manual_seed(1))
    # force both flip outcomes and the extreme offsets to appear
    top[:2], left[:2], flip[:2] = torch.tensor([0, 8]), torch.tensor([8, 0]), torch.tensor([True, False])
    out = crop_flip_at(images, 4, top, left, flip)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for b in range(len(images)):
        expected = TF.crop(TF.pad(images[b], [4]), int(top[b]), int(left[b]), 32, 32)
        if flip[b]:
            expected = TF.hflip(expected)
        assert torch.equal(out[b], expected), b


def test_offsets_and_flips_have_torchvisions_distribution() -> None:
    """torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip on an image whose pixels are all
    distinct: recover each output's (top, left, flip) and compare the marginals with ours."""
    n, padding = 900, 4
    image = torch.arange(3 * 32 * 32, dtype=torch.int32).view(3, 32, 32) % 251 + 1  # no zeros: padding is visible
    image = image.to(torch.uint8)
    image[0] = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(0)).view(32, 32) % 255 + 1
    recipe = T.Compose([T.RandomCrop(32, padding=padding), T.RandomHorizontalFlip()])
    padded = TF.pad(image, [padding])
    keys = [(t, left, f) for t in range(9) for left in range(9) for f in (False, True)]
    candidates = torch.stack([
        TF.hflip(TF.crop(padded, t, left, 32, 32)) if f else TF.crop(padded, t, left, 32, 32) for t, left, f in keys
    ])
    torch.manual_seed(0)
    theirs = []
    for _ in range(n):
        (match,) = (candidates == recipe(image)).all(dim=(1, 2, 3)).nonzero()[:, 0].tolist()
        theirs.append(keys[match])
    top, left, flip = draw_crop_flip(n, padding, torch.Generator().manual_seed(0))
    ours = list(zip(top.tolist(), left.tolist(), flip.tolist(), strict=True))
    for axis in range(2):  # uniform on 0..8, both
        for draws in (theirs, ours):
            counts = Counter(d[axis] for d in draws)
            assert set(counts) == set(range(9))
            assert max(abs(c / n - 1 / 9) for c in counts.values()) < 0.05
    for draws in (theirs, ours):
        assert abs(sum(d[2] for d in draws) / n - 0.5) < 0.06


def test_augment_batch_equals_crop_then_torchvision_normalize_and_views_are_independent() -> None:
    images = _images(4)
    out = augment_batch(images, CIFAR, "crop_flip", generator=torch.Generator().manual_seed(3))
    top, left, flip = draw_crop_flip(4, 4, torch.Generator().manual_seed(3))  # the same draws
    crops = crop_flip_at(images, 4, top, left, flip)
    expected = torch.stack([TF.normalize(c.float() / 255, CIFAR.mean, CIFAR.std) for c in crops])
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-6)

    views = augment_batch(images, CIFAR, "crop_flip", n_views=3, generator=torch.Generator().manual_seed(3))
    assert views.shape == (4, 3, 3, 32, 32)
    # view v of image b is the (b * V + v)-th draw
    top, left, flip = draw_crop_flip(12, 4, torch.Generator().manual_seed(3))
    crops = crop_flip_at(images.repeat_interleave(3, dim=0), 4, top, left, flip)
    assert torch.allclose(views.flatten(0, 1), normalize_uint8(crops, CIFAR.mean, CIFAR.std), atol=1e-6)
    assert not torch.equal(views[:, 0], views[:, 1])

    plain = augment_batch(images, CIFAR, "none")
    assert torch.allclose(plain, normalize_uint8(images, CIFAR.mean, CIFAR.std))
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(images.float(), CIFAR)


def test_normalisation_and_decoded_set_equal_the_cpu_eval_transform() -> None:
    """With augmentation ``none`` the device path gives exactly the CPU ``ToTensor`` + ``Normalize``
    images (including the once-only resize + centre-crop of 32 -> 24)."""
    module = OODDataModule(train=DatasetSpec(source="npz", path=TEST_2K, max_samples=12), test=DatasetSpec(
        source="npz", path=TEST_2K, max_samples=4), val_fraction=0.0)
    module.setup("fit")
    for cfg in (CIFAR, PreprocessConfig(image_size=24)):
        decoded = UInt8TrainingSet(module.train_images, cfg)
        reference = IndexedDataset(module.train_images, eval_transform(cfg))
        batch = torch.stack([decoded[i]["image"] for i in range(len(decoded))])
        assert batch.dtype == torch.uint8 and batch.shape == (12, 3, cfg.image_size, cfg.image_size)
        expected = torch.stack([reference[i]["image"] for i in range(len(reference))])
        assert torch.allclose(augment_batch(batch, cfg, "none"), expected, atol=1e-6)
        assert [decoded[i]["label"] for i in range(12)] == [reference[i]["label"] for i in range(12)]


@pytest.mark.parametrize(
    ("kwargs", "fields"),
    [
        ({"augmentation": "simclr"}, ("data.device_augmentation", "data.augmentation", "simclr")),
        ({"augmentation": "random_resized_crop"}, ("data.device_augmentation", "random_resized_crop")),
        ({"unlabeled": {"u": DatasetSpec(source="npz", path=TEST_2K)}}, ("data.device_augmentation", "data.unlabeled")),
    ],
)
def test_unsupported_combinations_are_refused_naming_the_fields(kwargs: dict, fields: tuple[str, ...]) -> None:
    with pytest.raises(DataConfigError) as error:
        OODDataModule(train=DatasetSpec(source="npz", path=TEST_2K), test=DatasetSpec(source="npz", path=TEST_2K),
                      device_augmentation=True, **kwargs)
    for field in fields:
        assert field in str(error.value)


class _Record(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.images: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.images.append(batch["image"][:2].clone())
        self.indices.append(batch["index"][:2].clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_fit_with_device_augmentation_trains_on_augmented_float_batches_and_lowers_the_loss() -> None:
    """ResNet-20 from scratch, 10 epochs of 64 real CIFAR-10 images with the device path and channels-last:
    every image the model sees is one of the 162 crop_flip outcomes of the right decoded image,
    normalised (never uint8), the outcomes vary, and the cross-entropy on the training images falls."""
    pl.seed_everything(0)
    model = Classifier(num_classes=10, backbone="cifar_resnet20", scheduler=None, scores=["msp"],
                       optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}})
    module = OODDataModule(train=DatasetSpec(source="npz", path=JPEG_5K, split="train", max_samples=64),
                           test=DatasetSpec(source="npz", path=TEST_2K, max_samples=8), val_fraction=0.0,
                           batch_size=32, device_augmentation=True)
    record = _Record()
    trainer = pl.Trainer(max_epochs=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[record, ChannelsLast()], deterministic=True)
    module.set_preprocess(model.preprocess)
    module.setup("fit")
    clean = augment_batch(module.train_dataset().images, model.preprocess, "none")
    labels = module.train_dataset().label_values

    def training_set_loss() -> float:
        model.eval()  # Lightning keeps the mode it finds: back to train() after
        with torch.no_grad():
            loss = float(torch.nn.functional.cross_entropy(model.forward_eval({"image": clean})["logits"], labels))
        model.train()
        return loss

    before = training_set_loss()
    trainer.fit(model, datamodule=module)
    assert len(record.losses) == 20
    decoded = module.train_dataset()
    assert isinstance(decoded, UInt8TrainingSet) and module.train_dataset() is decoded  # decoded once
    cfg = model.preprocess
    padded = TF.pad(decoded.images, [4])
    crops = torch.stack([  # every crop_flip outcome of every training image, normalised: [162, N, C, H, W]
        normalize_uint8(TF.hflip(c) if f else c, cfg.mean, cfg.std)
        for t in range(9) for left in range(9) for f in (False, True) for c in [padded[..., t:t + 32, left:left + 32]]
    ])
    outcomes = []
    for images, indices in zip(record.images, record.indices, strict=True):
        assert images.dtype == torch.float32 and images.shape == (2, 3, 32, 32)
        for image, index in zip(images, indices.tolist(), strict=True):
            (match,) = torch.isclose(crops[:, index], image, atol=1e-6).all(dim=(1, 2, 3)).nonzero()[:, 0].tolist()
            outcomes.append(match)
    assert len(set(outcomes)) > 16  # 32 images drawn from 162 outcomes: not one fixed crop
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert training_set_loss() < before - 0.3, (before, record.losses)


def test_datamodule_hook_augments_uint8_training_batches_only() -> None:
    """``on_after_batch_transfer``: uint8 batches become V normalised views; float (evaluation) batches and
    a datamodule without the option are left as they are."""
    kwargs = {"train": DatasetSpec(source="npz", path=TEST_2K), "test": DatasetSpec(source="npz", path=TEST_2K)}
    module = OODDataModule(**kwargs, device_augmentation=True, n_views=2, preprocess=CIFAR)
    batch = {"image": _images(3), "label": torch.arange(3), "index": torch.arange(3)}
    out = module.on_after_batch_transfer(batch, 0)
    assert out["image"].shape == (3, 2, 3, 32, 32) and out["image"].dtype == torch.float32
    assert torch.equal(out["label"], batch["label"]) and batch["image"].dtype == torch.uint8  # not mutated
    evaluation = {"image": torch.randn(3, 3, 32, 32), "label": torch.arange(3), "index": torch.arange(3)}
    assert module.on_after_batch_transfer(evaluation, 0)["image"] is evaluation["image"]
    plain = OODDataModule(**kwargs)
    assert plain.on_after_batch_transfer(batch, 0)["image"] is batch["image"]
