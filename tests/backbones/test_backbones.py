"""CIFAR ResNets, real ResNet-20 weights on real CIFAR-10 images, weights-file errors and timm backbones."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import resolve_data_config

from robustft.backbones import (
    BACKBONES,
    CifarResNet,
    TimmBackbone,
    WeightsError,
    create_backbone,
    read_state_dict,
)
from robustft.data.transforms import eval_transform
from robustft.methods import Classifier

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
RESNET20 = DATA / "weights" / "resnet20-12fca82f.th"
PNG_200 = DATA / "cifar10" / "cifar10_kaggle_train200_png.npz"
TEST_2K = DATA / "cifar10" / "cifar10_test_2k.npz"


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------ CIFAR ResNets
@pytest.mark.parametrize("depth, millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85)])
def test_cifar_resnet_sizes(depth: int, millions: float) -> None:
    backbone = create_backbone(f"cifar_resnet{depth}")
    assert isinstance(backbone, CifarResNet) and backbone.depth == depth
    assert backbone.feature_dim == 64
    # He et al. (2016) Table 6 counts include the 64x10 classifier
    assert n_params(backbone) + 64 * 10 + 10 == pytest.approx(millions * 1e6, rel=0.015)
    assert len(backbone.layer1) == len(backbone.layer2) == len(backbone.layer3) == (depth - 2) // 6
    features = backbone.eval()(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 64)
    assert backbone.preprocess.image_size == 32


def test_cifar_resnet_invalid_depth() -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth=21)
    with pytest.raises(KeyError, match="cifar_resnet20"):
        create_backbone("cifar_resnet21")
    assert "cifar_resnet110" in BACKBONES


def test_option_a_shortcut_has_no_parameters() -> None:
    backbone = CifarResNet(20)
    block = backbone.layer2[0]
    assert n_params(block.shortcut) == 0
    out = block.shortcut(torch.randn(2, 16, 32, 32))
    assert out.shape == (2, 32, 16, 16)
    assert torch.count_nonzero(out[:, :8]) == 0 and torch.count_nonzero(out[:, 24:]) == 0


# --------------------------------------------------------------------------- real ResNet-20 weights
def _images_to_batch(images: np.ndarray, preprocess) -> torch.Tensor:
    transform = eval_transform(preprocess)
    return torch.stack([transform(Image.fromarray(image)) for image in images])


@torch.inference_mode()
def _accuracy(logits_fn, path: Path, preprocess, batch_size: int = 500) -> float:
    with np.load(path) as arrays:
        images, labels = arrays["images"], arrays["labels"]
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = _images_to_batch(images[start : start + batch_size], preprocess)
        predictions = logits_fn(batch).argmax(1).numpy()
        correct += int((predictions == labels[start : start + batch_size]).sum())
    return correct / len(images)


@pytest.fixture
def one_thread():
    """Run a compute-heavy test on one intra-op thread: on a shared 2-core runner, two OpenMP threads
    competing with other processes are several times slower than one, and one thread also makes the
    floating-point reduction order (hence the numbers) the same on every machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def resnet20() -> CifarResNet:
    return create_backbone("cifar_resnet20", weights=str(RESNET20)).eval()


def test_real_resnet20_weights_classify_cifar10(resnet20: CifarResNet, one_thread) -> None:
    head = resnet20.pretrained_head
    assert set(head) == {"weight", "bias"}
    assert head["weight"].shape == (10, 64) and head["bias"].shape == (10,)

    def logits(images: torch.Tensor) -> torch.Tensor:
        return resnet20(images) @ head["weight"].T + head["bias"]

    lossless = _accuracy(logits, PNG_200, resnet20.preprocess)
    assert lossless >= 0.95, lossless
    jpeg = _accuracy(logits, TEST_2K, resnet20.preprocess)
    assert jpeg >= 0.75, jpeg


def test_cifar_resnet_runs_channels_last_with_nchw_results(resnet20: CifarResNet) -> None:
    """The NHWC speed-up must survive weight loading and change nothing but float rounding."""
    convs = [m for m in resnet20.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(resnet20).to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        features = resnet20(images)
        x = F.relu(reference.bn1(reference.conv1(images)))  # the forward pass, kept NCHW throughout
        x = reference.layer3(reference.layer2(reference.layer1(x)))
        expected = F.adaptive_avg_pool2d(x, 1).flatten(1)
    assert not x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)


def test_real_weights_through_classifier(resnet20: CifarResNet) -> None:
    model = Classifier(num_classes=10, backbone="cifar_resnet20", backbone_weights=str(RESNET20)).eval()
    torch.testing.assert_close(model.head.weight, resnet20.pretrained_head["weight"])
    torch.testing.assert_close(model.head.bias, resnet20.pretrained_head["bias"])
    with np.load(PNG_200) as arrays:
        images, labels = arrays["images"], arrays["labels"]
    batch = {"image": _images_to_batch(images, model.preprocess), "label": torch.from_numpy(labels)}
    with torch.no_grad():
        outputs = model.forward_eval(batch)
    assert outputs["logits"].shape == (200, 10) and outputs["features"].shape == (200, 64)
    accuracy = (outputs["logits"].argmax(1) == batch["label"]).float().mean().item()
    assert accuracy >= 0.95


def test_classifier_with_other_class_count_keeps_backbone_warns_on_head() -> None:
    with pytest.warns(UserWarning, match="initialised randomly"):
        model = Classifier(num_classes=5, backbone="cifar_resnet20", backbone_weights=str(RESNET20))
    file_state = read_state_dict(RESNET20)
    torch.testing.assert_close(model.backbone.conv1.weight, file_state["conv1.weight"])
    assert model.head.weight.shape == (5, 64)


def test_read_state_dict_strips_module_prefix() -> None:
    state = read_state_dict(RESNET20)
    assert "conv1.weight" in state and "linear.weight" in state
    assert not any(k.startswith("module.") for k in state)


def test_lightning_style_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = Classifier(num_classes=10)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    backbone = create_backbone("cifar_resnet20", weights=str(path))
    torch.testing.assert_close(backbone.conv1.weight, source.backbone.conv1.weight)
    torch.testing.assert_close(backbone.pretrained_head["weight"], source.head.weight)


# ---------------------------------------------------------------------------------- weights errors
def test_resnet32_weights_into_resnet20(tmp_path: Path) -> None:
    path = tmp_path / "resnet32.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in CifarResNet(32).state_dict().items()}}, path)
    with pytest.raises(WeightsError) as info:
        create_backbone("cifar_resnet20", weights=str(path))
    message = str(info.value)
    assert str(path) in message and "unexpected" in message and "layer1.3." in message
    # and the other way round: keys the file lacks are named as missing
    with pytest.raises(WeightsError, match=r"missing \[.layer1\.5\."):
        create_backbone("cifar_resnet56", weights=str(path))


def test_wrong_shapes_are_named(tmp_path: Path) -> None:
    state = CifarResNet(20).state_dict()
    state["conv1.weight"] = torch.zeros(8, 3, 3, 3)
    path = tmp_path / "narrow.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"shape mismatch.*conv1\.weight"):
        create_backbone("cifar_resnet20", weights=str(path))


def test_missing_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.th"
    with pytest.raises(WeightsError, match="does not exist") as info:
        create_backbone("cifar_resnet20", weights=str(missing))
    assert str(missing) in str(info.value)


def test_garbage_weights_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.th"
    garbage.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(WeightsError, match="cannot read weights file") as info:
        create_backbone("cifar_resnet20", weights=str(garbage))
    assert str(garbage) in str(info.value)


def test_file_without_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match="holds no state dict") as info:
        create_backbone("cifar_resnet20", weights=str(path))
    assert str(path) in str(info.value)


def test_weights_errors_surface_through_classifier(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        Classifier(num_classes=10, backbone_weights=str(tmp_path / "missing.th"))


# ------------------------------------------------------------------------------------------- timm
def test_timm_backbone_features_and_preprocess() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("timm/test_resnet")
    assert isinstance(backbone, TimmBackbone)
    config = resolve_data_config({}, model=timm.create_model("test_resnet"))
    assert backbone.preprocess.image_size == config["input_size"][-1]
    assert backbone.preprocess.mean == tuple(config["mean"])
    assert backbone.preprocess.std == tuple(config["std"])
    assert backbone.preprocess.interpolation == config["interpolation"]
    size = backbone.preprocess.image_size
    features = backbone.eval()(torch.randn(2, 3, size, size))
    assert features.shape == (2, backbone.feature_dim)
    assert backbone.feature_dim == timm.create_model("test_resnet").num_features


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_convnext"])
def test_timm_state_dict_from_local_file(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    source = timm.create_model(name, num_classes=7).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(source.state_dict(), path)
    backbone = create_backbone(f"timm/{name}", weights=str(path)).eval()
    head = backbone.pretrained_head
    assert head["weight"].shape == (7, backbone.feature_dim) and head["bias"].shape == (7,)
    size = backbone.preprocess.image_size
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = source(images)
        got = backbone(images) @ head["weight"].T + head["bias"]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    model = Classifier(num_classes=7, backbone=f"timm/{name}", backbone_weights=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, atol=1e-4, rtol=1e-4)


def test_unknown_timm_model() -> None:
    with pytest.raises(ValueError, match="unknown timm model 'test_resnett'.*test_resnet"):
        create_backbone("timm/test_resnett")
