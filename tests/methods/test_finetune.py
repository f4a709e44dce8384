"""Finetune: CLIP zero-shot head, soft-target losses (BANG), linear-classifier mode. CPU, offline.

Real ResNet-20 weights and real bundled CIFAR-10 images where a trained model matters; a random-init
``robustft-micro-vit`` CLIP only for structural checks of the zero-shot head.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from robustft.backbones.clip import CLIPBackbone
from robustft.data.sources import DatasetSpec, load_dataset
from robustft.data.transforms import eval_transform
from robustft.evaluation.weight_space import build_model_at_alpha, head_keys, model_state, scale_head
from robustft.losses import mixup, smooth_labels, soft_cross_entropy
from robustft.methods import Classifier, ConfigMismatchError, Finetune

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = str(REPO / "data" / "weights" / "resnet20-12fca82f.th")
CIFAR_TEST = str(REPO / "data" / "cifar10" / "cifar10_test_2k.npz")
MICRO = "robustft-micro-vit"
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}.", "art of the {}."]


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """32 real CIFAR-10 test images, normalised for the ResNet-20."""
    model = Finetune(backbone_weights=WEIGHTS)
    images = load_dataset(DatasetSpec(source="npz", path=CIFAR_TEST, max_samples=32), "test")
    transform = eval_transform(model.preprocess)
    pairs = [images[i] for i in range(len(images))]
    return {
        "image": torch.stack([transform(image) for image, _ in pairs]),
        "label": torch.tensor([label for _, label in pairs]),
        "index": torch.arange(len(pairs)),
    }


@pytest.fixture(scope="module")
def micro_clip_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CLIPBackbone]:
    """A random-init micro CLIP saved as a plain open_clip state dict (the format of exported weights)."""
    torch.manual_seed(0)
    clip = CLIPBackbone(MICRO).eval()
    path = tmp_path_factory.mktemp("clip") / "micro.pt"
    torch.save(clip.model.state_dict(), path)
    return path, clip


# ---- zero-shot head (WiSE-FT) ---------------------------------------------------------------------


def test_zero_shot_head_reproduces_the_zero_shot_classifier(micro_clip_file) -> None:
    path, clip = micro_clip_file
    model = Finetune(
        num_classes=10, backbone=f"clip:{MICRO}", backbone_weights=str(path), zero_shot_head=True,
        class_names=NAMES, templates=TEMPLATES,
    ).eval()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        text = clip.text_classifier(NAMES, TEMPLATES)
        zero_shot = clip.logit_scale * clip.encode_image(images) @ text.T
        logits = model.forward_eval({"image": images})["logits"]
    torch.testing.assert_close(logits, zero_shot, rtol=1e-6, atol=1e-6)
    assert torch.equal(logits.argmax(1), zero_shot.argmax(1))
    # head = s · normalised text embeddings, bias 0; features enter the head normalised
    s = float(clip.logit_scale.detach())
    torch.testing.assert_close(model.head.weight.norm(dim=1), torch.full((10,), s), rtol=1e-6, atol=0)
    assert torch.equal(model.head.bias, torch.zeros(10))
    assert model.normalize_features
    # logits are invariant to rescaling the image feature (normalisation before the head)
    with torch.no_grad():
        feats = model.backbone(images)
        torch.testing.assert_close(model.head(F.normalize(3.7 * feats, dim=-1)), logits, rtol=1e-6, atol=1e-6)
    # the text tower is dropped: checkpoints and averages hold the image tower and the head only
    keys = list(model.state_dict())
    assert all(k.startswith(("backbone.visual.", "head.")) for k in keys), keys[:5]
    assert not model.backbone.has_text_tower
    assert model.preprocess == clip.preprocess


def test_zero_shot_head_does_not_depend_on_template_order(micro_clip_file) -> None:
    path, _ = micro_clip_file
    kwargs = dict(num_classes=10, backbone=f"clip:{MICRO}", backbone_weights=str(path), zero_shot_head=True,
                  class_names=NAMES)
    a = Finetune(templates=TEMPLATES, **kwargs)
    b = Finetune(templates=TEMPLATES[::-1], **kwargs)
    torch.testing.assert_close(a.head.weight, b.head.weight, rtol=1e-6, atol=1e-6)


def test_zero_shot_head_config_errors(micro_clip_file) -> None:
    path, _ = micro_clip_file
    with pytest.raises(ConfigMismatchError, match="CLIP backbone"):
        Finetune(backbone_weights=WEIGHTS, zero_shot_head=True, class_names=NAMES)
    with pytest.raises(ConfigMismatchError, match="class_names"):
        Finetune(backbone=f"clip:{MICRO}", backbone_weights=str(path), zero_shot_head=True)
    with pytest.raises(ConfigMismatchError, match="3 names"):
        Finetune(backbone=f"clip:{MICRO}", backbone_weights=str(path), zero_shot_head=True, class_names=NAMES[:3])
    with pytest.raises(ConfigMismatchError, match="exactly one"):
        Finetune(backbone=f"clip:{MICRO}", backbone_weights=str(path), zero_shot_head=True, class_names=NAMES,
                 templates=["no placeholder"])


# ---- losses (BANG) -------------------------------------------------------------------------------


def test_no_smoothing_no_mixup_is_exactly_plain_cross_entropy(batch) -> None:
    torch.manual_seed(0)
    model = Finetune(backbone_weights=WEIGHTS, label_smoothing=0.0, mixup_alpha=0.0).train()
    loss = model.training_losses(batch)["ce"]
    expected = F.cross_entropy(model(batch["image"]), batch["label"])
    assert torch.equal(loss, expected)
    # ... and exactly the Classifier's loss on the same weights
    classifier = Classifier(backbone_weights=WEIGHTS).train()
    classifier.load_state_dict(model.state_dict())
    assert torch.equal(classifier.training_losses(batch)["ce"], loss)
    # the soft-target path with one-hot targets agrees with it
    onehot = smooth_labels(batch["label"], 10, 0.0)
    torch.testing.assert_close(soft_cross_entropy(model(batch["image"]), onehot), loss, rtol=1e-6, atol=1e-6)


def test_label_smoothing_matches_soft_targets(batch) -> None:
    model = Finetune(backbone_weights=WEIGHTS, label_smoothing=0.1).eval()  # eval: deterministic BN
    loss = model.training_losses(batch)["ce"]
    soft = soft_cross_entropy(model(batch["image"]), smooth_labels(batch["label"], 10, 0.1))
    torch.testing.assert_close(loss, soft, rtol=1e-6, atol=1e-6)
    assert loss > F.cross_entropy(model(batch["image"]), batch["label"])  # a confident model pays for ε


def test_mixup_loss_is_soft_cross_entropy_on_the_mixed_batch(batch) -> None:
    model = Finetune(backbone_weights=WEIGHTS, label_smoothing=0.1, mixup_alpha=0.5).eval()
    torch.manual_seed(7)
    loss = model.training_losses(batch)["ce"]
    torch.manual_seed(7)
    images, targets, lam = mixup(batch["image"], smooth_labels(batch["label"], 10, 0.1), 0.5)
    assert 0.0 < lam < 1.0
    assert torch.equal(loss, soft_cross_entropy(model(images), targets))
    torch.testing.assert_close(targets.sum(1), torch.ones(len(targets)))


def test_invalid_mixup_alpha() -> None:
    with pytest.raises(ConfigMismatchError, match="mixup_alpha"):
        Finetune(backbone_weights=WEIGHTS, mixup_alpha=-0.1)


# ---- linear-classifier mode -----------------------------------------------------------------------


def test_linear_classifier_mode_trains_the_head_only_and_keeps_bn_frozen() -> None:
    model = Finetune(backbone_weights=WEIGHTS, freeze_backbone=True).train()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert not model.backbone.training and model.head.training
    assert not model.normalize_features  # CIFAR ResNet: the pre-trained head expects raw features


def test_lc_weight_space_ensemble_equals_output_space_ensemble(batch) -> None:
    """Spec 2(c): with a shared frozen encoder WiSE-FT LC is the output ensemble, for every α;
    BANG's head temperature then scales the fine-tuned logits exactly."""
    model = Finetune(backbone_weights=WEIGHTS, freeze_backbone=True).eval()
    theta0 = model_state(model)
    theta1 = dict(theta0)
    generator = torch.Generator().manual_seed(0)
    theta1["head.weight"] = theta0["head.weight"] + 0.3 * torch.randn(theta0["head.weight"].shape, generator=generator)
    theta1["head.bias"] = theta0["head.bias"] + 0.3 * torch.randn(10, generator=generator)
    with torch.no_grad():
        build_model_at_alpha(model, theta0, theta1, 0.0)
        f0 = model(batch["image"])
        build_model_at_alpha(model, theta0, theta1, 1.0)
        f1 = model(batch["image"])
        for alpha in (0.25, 0.5, 0.8):
            build_model_at_alpha(model, theta0, theta1, alpha)
            torch.testing.assert_close(model(batch["image"]), (1 - alpha) * f0 + alpha * f1, rtol=1e-5, atol=1e-5)
        # the head BANG scales is the classifier head the scores read, found in the state dict
        keys = head_keys(model)
        assert keys == ("head.weight", "head.bias")
        # T = 2 is a power of two: dividing the head divides the logits exactly
        build_model_at_alpha(model, theta0, scale_head(theta1, keys, 2.0), 1.0)
        assert torch.equal(model(batch["image"]), f1 / 2)
        build_model_at_alpha(model, theta0, scale_head(theta1, keys, 1.0), 1.0)
        assert torch.equal(model(batch["image"]), f1)
