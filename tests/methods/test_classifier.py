"""Classifier (backbone + linear head) and the OODMethod plumbing it inherits, on real CIFAR-10 images."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from robustft.backbones.base import PreprocessConfig
from robustft.data import DatasetSpec, OODDataModule, load_dataset
from robustft.methods import Classifier, ConfigMismatchError, OODMethod
from robustft.optim import build_optimizer

SGD = "torch.optim.SGD"


def total_loss(model: OODMethod, batch: dict[str, Tensor]) -> Tensor:
    return OODMethod.total_loss(model.training_losses(batch))

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
JPEG_5K = str(DATA / "cifar10" / "cifar10_train_5k_jpeg.npz")
TEST_2K = str(DATA / "cifar10" / "cifar10_test_2k.npz")
MEAN = torch.tensor((0.485, 0.456, 0.406))[:, None, None]
STD = torch.tensor((0.229, 0.224, 0.225))[:, None, None]


def to_batch(images: np.ndarray, labels: np.ndarray) -> dict[str, Tensor]:
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - MEAN) / STD
    return {
        "image": x.contiguous(),
        "label": torch.from_numpy(labels).long(),
        "index": torch.arange(len(labels)),
    }


@pytest.fixture(scope="module")
def real_batch() -> dict[str, Tensor]:
    with np.load(TEST_2K) as arrays:
        return to_batch(arrays["images"][:8], arrays["labels"][:8])


def small_datamodule(**kwargs) -> OODDataModule:
    return OODDataModule(
        train=DatasetSpec(source="npz", path=TEST_2K, max_samples=32),
        test=DatasetSpec(source="npz", path=TEST_2K, max_samples=8),
        batch_size=4,
        val_fraction=0.25,
        augmentation="none",
        **kwargs,
    )


def trainer(**kwargs) -> pl.Trainer:
    kwargs.setdefault("fast_dev_run", 1)
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


# ------------------------------------------------------------------------------------ forward_eval
def test_forward_eval_returns_logits_and_features(real_batch: dict) -> None:
    torch.manual_seed(0)
    model = Classifier(num_classes=10).eval()
    with torch.no_grad():
        outputs = model.forward_eval(real_batch)
        logits = model(real_batch["image"])
    assert outputs["logits"].shape == (8, 10) and outputs["features"].shape == (8, 64)
    assert model.output_keys() == {"logits", "features"}
    torch.testing.assert_close(outputs["logits"], logits)
    torch.testing.assert_close(outputs["logits"], model.head(outputs["features"]))
    weight, bias = model.classifier_head()
    assert weight.shape == (10, 64) and bias.shape == (10,)
    assert model.preprocess == model.backbone.preprocess == PreprocessConfig(image_size=32)
    scores = model.ood_scores(outputs)
    assert set(scores) == {"msp", "maxlogit", "energy"}
    assert all(s.shape == (8,) for s in scores.values())


def test_predict_step(real_batch: dict) -> None:
    torch.manual_seed(0)
    model = Classifier(num_classes=10, scores=["msp", "gen"]).eval()
    with torch.no_grad():
        out = model.predict_step(real_batch, 0)
    assert set(out) == {"index", "prediction", "msp", "gen"}
    assert out["prediction"].shape == (8,)


# ------------------------------------------------------------------------------------ freezing
def _bn_state(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def test_freeze_backbone_trains_the_head_only(real_batch: dict) -> None:
    torch.manual_seed(0)
    model = Classifier(num_classes=10, freeze_backbone=True)
    model.train()
    assert model.training and model.head.training
    assert not model.backbone.training  # BatchNorm of a frozen backbone stays in eval mode
    before = _bn_state(model.backbone)
    loss = total_loss(model, real_batch)
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.weight.grad is not None and model.head.bias.grad is not None
    after = _bn_state(model.backbone)
    assert before.keys() == after.keys() and len(before) > 0
    for key in before:
        assert torch.equal(before[key], after[key]), key
    trainable = model.trainable_parameters()
    assert len(trainable) == 2
    assert {id(p) for p in trainable} == {id(model.head.weight), id(model.head.bias)}
    optimizer = build_optimizer(trainable, {"class_path": SGD, "init_args": {"lr": 0.1, "momentum": 0.0}})
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == 64 * 10 + 10


def test_frozen_backbone_batchnorm_is_unchanged_by_a_real_fit() -> None:
    """Through Lightning's own loop, which never calls ``train()`` at fit start (Lightning >= 2.2): a model
    built in train mode used to fit its frozen backbone's BatchNorm statistics to the data."""
    torch.manual_seed(0)
    model = Classifier(num_classes=10, freeze_backbone=True, scores=["msp"])
    before = _bn_state(model.backbone)
    trainer(fast_dev_run=3).fit(model, datamodule=small_datamodule())
    assert not model.backbone.training
    for key, value in _bn_state(model.backbone).items():
        assert torch.equal(before[key], value), key


def test_unfrozen_backbone_updates_batchnorm(real_batch: dict) -> None:
    """The counterpart of the frozen case, so the check above is meaningful."""
    torch.manual_seed(0)
    model = Classifier(num_classes=10).train()
    before = _bn_state(model.backbone)
    total_loss(model, real_batch).backward()
    after = _bn_state(model.backbone)
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    assert all(p.grad is not None for p in model.backbone.parameters())


# ------------------------------------------------------------------------------------ loss
def test_label_smoothing_is_passed_to_the_loss(real_batch: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Classifier(num_classes=10, label_smoothing=0.2).eval()
    with torch.no_grad():
        logits = model(real_batch["image"])
        loss = total_loss(model, real_batch)
    labels = real_batch["label"]
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, label_smoothing=0.2))
    assert not torch.allclose(loss, F.cross_entropy(logits, labels))

    seen = []
    original = F.cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs.get("label_smoothing"))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)
    with torch.no_grad():
        total_loss(model, real_batch)
    assert seen == [0.2]


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_label_smoothing_range(value: float) -> None:
    with pytest.raises(ValueError, match="model.label_smoothing"):
        Classifier(num_classes=10, label_smoothing=value)


# ------------------------------------------------------------------------------------ Lightning
def test_short_fit_logs_training_loss() -> None:
    torch.manual_seed(0)
    model = Classifier(num_classes=10, scheduler=None)
    fit = trainer()
    fit.fit(model, datamodule=small_datamodule())
    assert "train/loss" in fit.callback_metrics and torch.isfinite(fit.callback_metrics["train/loss"])
    assert "val/acc" in fit.callback_metrics


def test_class_count_mismatch_is_refused_in_setup() -> None:
    model = Classifier(num_classes=5)
    with pytest.raises(ConfigMismatchError) as info:
        trainer().fit(model, datamodule=small_datamodule())
    message = str(info.value)
    assert "model.num_classes is 5" in message and "10 classes" in message and "num_classes: 10" in message
    assert model.global_step == 0


def test_nan_loss_names_the_global_step(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Classifier(num_classes=10, scheduler=None)
    real_losses = model.training_losses
    calls = []

    def loss_turning_nan(batch: dict) -> dict[str, Tensor]:
        calls.append(1)
        losses = real_losses(batch)
        losses["extra"] = losses["ce"].detach() * (float("nan") if len(calls) == 3 else 0.0)
        return losses

    monkeypatch.setattr(model, "training_losses", loss_turning_nan)
    with pytest.raises(FloatingPointError, match=r"at global step 2 \(epoch 0\)") as info:
        trainer(fast_dev_run=False, max_steps=5, limit_val_batches=0).fit(
            model, datamodule=small_datamodule()
        )
    message = str(info.value)
    assert "term 'extra' is nan" in message and "'ce'" not in message, message
    assert "model.init_args.optimizer.init_args.lr" in message


# ------------------------------------------------------------------------------------ scores config
def test_unknown_score_name_suggests_close_match() -> None:
    with pytest.raises(ConfigMismatchError) as info:
        Classifier(num_classes=10, scores=["msp", "enrgy"])
    message = str(info.value)
    assert message.startswith("model.scores") and "'enrgy'" in message and "Did you mean 'energy'" in message


def test_score_kwargs_for_unlisted_score() -> None:
    with pytest.raises(ConfigMismatchError, match=r"model.score_kwargs names \['knn'\]"):
        Classifier(num_classes=10, scores=["msp"], score_kwargs={"knn": {"k": 5}})


def test_feature_scores_build_on_the_classifier() -> None:
    model = Classifier(num_classes=10, scores=["knn", "vim", "react"], score_kwargs={"knn": {"k": 5}})
    assert set(model.build_scores()) == {"knn", "vim", "react"}
    assert model.needs_reference()


class LogitsOnly(OODMethod):
    """A method whose forward_eval exposes logits only (no features, no linear head)."""

    def __init__(self, num_classes: int = 3, scores: list[str] | None = None) -> None:
        super().__init__(num_classes, scores)
        self.linear = torch.nn.Linear(12, num_classes)

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=2)

    def forward_eval(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"logits": self.linear(batch["image"].flatten(1))}

    def training_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"ce": F.cross_entropy(self.forward_eval(batch)["logits"], batch["label"])}


def test_feature_score_on_a_logits_only_method_is_refused() -> None:
    model = LogitsOnly(scores=["msp", "knn"])  # the name exists; the requirement is checked when built
    with pytest.raises(ValueError) as info:
        model.build_scores()
    message = str(info.value)
    assert "'knn'" in message and "features" in message and "logits" in message
    with pytest.raises(ValueError, match="'knn'"):
        model.needs_reference()


def test_logits_only_method_with_logit_scores() -> None:
    model = LogitsOnly(scores=["msp", "energy"])
    outputs = model.forward_eval({"image": torch.randn(4, 3, 2, 2)})
    scores = model.ood_scores(outputs)
    assert set(scores) == {"msp", "energy"} and not model.needs_reference()


def test_num_classes_must_be_positive() -> None:
    with pytest.raises(ConfigMismatchError, match="model.num_classes"):
        LogitsOnly(num_classes=0)


# ------------------------------------------------------------------------------------ learning
@pytest.fixture
def one_thread():
    """Run a compute-heavy test on one intra-op thread: on a shared 2-core runner, two OpenMP threads
    competing with other processes are several times slower than one, and one thread also makes the
    floating-point reduction order (hence the numbers) the same on every machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_lowers_the_loss_on_real_cifar10(one_thread) -> None:
    """30 SGD steps (batch 32, about two epochs) of a randomly initialised ResNet-20 on 512 real CIFAR-10
    training images lower the mean loss on those images well below the chance level ln(10) = 2.30.

    The loss is measured with batch statistics (train-mode BatchNorm, no gradient) before and after, so
    the untrained model is not judged with its uncalibrated running statistics. Observed (one thread):
    2.43 -> 1.89 (ratio 0.78); other model seeds gave ratios 0.77-0.80, hence the 0.85 bound.
    """
    images = load_dataset(DatasetSpec(source="npz", path=JPEG_5K, max_samples=512, seed=0), "data.train")
    data = to_batch(images.images, images.labels)
    # channels_last only makes the CPU convolutions faster; the numbers are the same computation
    x, y = data["image"].contiguous(memory_format=torch.channels_last), data["label"]
    torch.manual_seed(0)
    model = Classifier(num_classes=10).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(
        model.trainable_parameters(),
        {"class_path": SGD, "init_args": {"lr": 0.02, "weight_decay": 5e-4, "momentum": 0.9}},
    )

    def mean_loss() -> float:
        model.train()
        with torch.no_grad():
            total = sum(
                total_loss(model, {"image": x[s : s + 256], "label": y[s : s + 256]}).item() * 256
                for s in (0, 256)
            )
        return total / 512

    initial = mean_loss()
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(512, generator=generator)
    for step in range(30):
        start = (step * 32) % 512
        if start == 0 and step:
            order = torch.randperm(512, generator=generator)
        idx = order[start : start + 32]
        loss = total_loss(model, {"image": x[idx], "label": y[idx]})
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = mean_loss()
    assert initial > 2.2, initial
    assert final < 0.85 * initial and final < 2.1, (initial, final)
