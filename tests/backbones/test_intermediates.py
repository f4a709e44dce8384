"""``forward_intermediates`` on every backbone kind: CIFAR ResNet, timm (CNN and ViT), open_clip ViT and
ModifiedResNet towers. Micro models, random init, CPU, offline.

For each kind: the keys/shapes of the contract in ``robustft.backbones.base.Backbone``, intermediate
levels that chain into each other (or equal an independent reference), and the last level pooled
with the backbone's own pooling reproduces ``forward(images)`` bit for bit.
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel

from robustft.backbones import CifarResNet, TimmBackbone, create_backbone
from robustft.backbones.base import resolve_indices
from robustft.backbones.clip import (
    CLIPBackbone,
    register_clip_configs,
    visual_forward_intermediates,
    vit_global_and_local,
)
from robustft.backbones.clip_image import CLIPImageBackbone

MICRO_VIT = "robustft-micro-vit"
MICRO_RN = "robustft-test-micro-rn"  # registered from a temporary folder by the fixture below


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def micro_rn_config(tmp_path_factory) -> str:
    """A CLIP RN50-style (ModifiedResNet) micro config: 1 bottleneck per stage, width 8, 64 px input."""
    folder = tmp_path_factory.mktemp("clip_rn_config")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / f"{MICRO_RN}.json").write_text(json.dumps(config))
    register_clip_configs(folder)
    return MICRO_RN


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- index resolution -----------------------------------------------------------------------------


def test_resolve_indices_like_timm():
    assert resolve_indices(4, None) == [0, 1, 2, 3]
    assert resolve_indices(4, 1) == [3]
    assert resolve_indices(4, 4) == [0, 1, 2, 3]
    assert resolve_indices(4, [-1, 0, 3, -4]) == [0, 3]  # non-negative, sorted, each once
    assert resolve_indices(4, (2, torch.tensor(1))) == [1, 2]


@pytest.mark.parametrize(
    "indices, match",
    [
        (0, r"int in 1\.\.4"),
        (5, r"int in 1\.\.4"),
        ([4], r"index 4 is out of range.*-4\.\.3"),
        ([-5], r"index -5 is out of range.*-4\.\.3"),
        ([], r"empty.*-4\.\.3"),
        ([1.0], r"not an int.*-4\.\.3"),
        (True, "must be None, an int"),
        ("1", "must be None, an int"),
    ],
)
def test_resolve_indices_errors_name_the_range(indices, match):
    with pytest.raises(ValueError, match=match):
        resolve_indices(4, indices, "stage")


# ---- CIFAR ResNet ---------------------------------------------------------------------------------


def test_cifar_resnet_stages():
    torch.manual_seed(0)
    backbone = CifarResNet(20).eval()
    images = randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = backbone.forward_intermediates(images)
        assert backbone.num_intermediates == 4
        assert list(feats) == [0, 1, 2, 3]
        assert [tuple(f.shape) for f in feats.values()] == [
            (2, 16, 32, 32),
            (2, 16, 32, 32),
            (2, 32, 16, 16),
            (2, 64, 8, 8),
        ]
        # each stage is the next module applied to the previous level (no level skipped or repeated)
        assert torch.equal(
            feats[0],
            F.relu(backbone.bn1(backbone.conv1(images.contiguous(memory_format=torch.channels_last)))),
        )
        assert torch.equal(feats[1], backbone.layer1(feats[0]))
        assert torch.equal(feats[2], backbone.layer2(feats[1]))
        assert torch.equal(feats[3], backbone.layer3(feats[2]))
        # the pooled path is the average pool of the last stage
        assert torch.equal(F.adaptive_avg_pool2d(feats[3], 1).flatten(1), backbone(images))
        # selections return the same tensors
        last_two = backbone.forward_intermediates(images, 2)
        assert list(last_two) == [2, 3] and torch.equal(last_two[3], feats[3])
        picked = backbone.forward_intermediates(images, [-1, 1])
        assert list(picked) == [1, 3] and torch.equal(picked[1], feats[1])


# ---- timm ------------------------------------------------------------------------------------------


def test_timm_cnn_stages_through_timm():
    torch.manual_seed(0)
    backbone = TimmBackbone("test_resnet").eval()
    images = randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone.forward_intermediates(images)
        info = backbone.model.feature_info
        assert backbone.num_intermediates == len(info) == 5 and list(feats) == [0, 1, 2, 3, 4]
        for i, feat in feats.items():
            side = 64 // info[i]["reduction"]
            assert feat.shape == (2, info[i]["num_chs"], side, side)
        assert torch.equal(backbone.model.forward_head(feats[4]), backbone(images))
        picked = backbone.forward_intermediates(images, [-2])
        assert list(picked) == [3] and torch.equal(picked[3], feats[3])


def test_timm_vit_blocks_are_full_token_sequences():
    torch.manual_seed(0)
    backbone = TimmBackbone("test_vit").eval()
    model = backbone.model
    size = backbone.preprocess.image_size
    images = randn(2, 3, size, size)
    grid = size // model.patch_embed.patch_size[0]
    with torch.no_grad():
        feats = backbone.forward_intermediates(images)
        n = len(model.blocks)
        assert backbone.num_intermediates == n and list(feats) == list(range(n))
        assert all(
            f.shape == (2, model.num_prefix_tokens + grid * grid, model.embed_dim) for f in feats.values()
        )
        # prefix tokens first, then the patch tokens in raster order (timm's default NCHW output)
        grids = model.forward_intermediates(images, indices=[0, n - 1], intermediates_only=True)
        for got, ref in zip((feats[0], feats[n - 1]), grids, strict=True):
            assert torch.equal(got[:, model.num_prefix_tokens :], ref.flatten(2).transpose(1, 2))
        assert torch.equal(model.forward_head(model.norm(feats[n - 1])), backbone(images))
        with pytest.raises(ValueError, match=rf"-{n}\.\.{n - 1}"):
            backbone.forward_intermediates(images, [n])


# ---- open_clip ViT ---------------------------------------------------------------------------------


def test_clip_vit_blocks_expose_class_and_patch_tokens():
    torch.manual_seed(0)
    backbone = CLIPBackbone(MICRO_VIT).eval()
    visual = backbone.model.visual
    images = randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = backbone.forward_intermediates(images)
        assert backbone.num_intermediates == 2 and list(feats) == [0, 1]
        assert all(f.shape == (3, 1 + 16, 64) for f in feats.values())  # class token + 4x4 patches, width 64
        assert torch.equal(feats[0], visual.transformer.resblocks[0](visual._embeds(images)))
        assert torch.equal(feats[1], visual.transformer.resblocks[1](feats[0]))
        # independent reference: open_clip's own forward_intermediates (patch grid + class token apart)
        ref = visual.forward_intermediates(
            images, indices=[0, 1], intermediates_only=True, output_extra_tokens=True
        )
        for i in (0, 1):
            assert torch.equal(feats[i][:, :1], ref["image_intermediates_prefix"][i])
            assert torch.equal(feats[i][:, 1:], ref["image_intermediates"][i].flatten(2).transpose(1, 2))
        pooled, _ = visual._pool(feats[1])
        assert torch.equal(pooled @ visual.proj, backbone(images))
        assert torch.equal(vit_global_and_local(visual, images)[0], backbone(images))
        assert list(backbone.forward_intermediates(images, [-2])) == [0]
        with pytest.raises(ValueError, match=r"block index 2 is out of range.*-2\.\.1"):
            backbone.forward_intermediates(images, [2])


def test_clip_image_backbone_intermediates():
    torch.manual_seed(0)
    backbone = create_backbone(f"clip:{MICRO_VIT}").eval()
    assert isinstance(backbone, CLIPImageBackbone)
    images = randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = backbone.forward_intermediates(images, 1)
        assert list(feats) == [1] and feats[1].shape == (2, 17, 64)
        pooled, _ = backbone.visual._pool(feats[1])
        assert torch.equal(pooled @ backbone.visual.proj, backbone(images))


# ---- open_clip ModifiedResNet ----------------------------------------------------------------------


def test_clip_modified_resnet_stages(micro_rn_config):
    torch.manual_seed(0)
    backbone = CLIPBackbone(micro_rn_config).eval()
    visual = backbone.model.visual
    assert isinstance(visual, open_clip.modified_resnet.ModifiedResNet)
    images = randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone.forward_intermediates(images)
        assert backbone.num_intermediates == 5 and list(feats) == [0, 1, 2, 3, 4]
        assert [tuple(f.shape) for f in feats.values()] == [
            (2, 8, 16, 16),
            (2, 32, 16, 16),
            (2, 64, 8, 8),
            (2, 128, 4, 4),
            (2, 256, 2, 2),
        ]
        ref = visual.forward_intermediates(images, intermediates_only=True)["image_intermediates"]
        assert all(torch.equal(feats[i], ref[i]) for i in range(5))
        assert torch.equal(visual.attnpool(feats[4]), backbone(images))
        picked = backbone.forward_intermediates(images, [0, -1])
        assert list(picked) == [0, 4] and torch.equal(picked[4], feats[4])
        with pytest.raises(ValueError, match=r"stage index 5 is out of range.*-5\.\.4"):
            backbone.forward_intermediates(images, [5])
        with pytest.raises(NotImplementedError, match="VisionTransformer"):
            backbone.encode_image_with_local(images)

        image_backbone = create_backbone(f"clip:{micro_rn_config}").eval()
        last = image_backbone.forward_intermediates(images, 1)
        assert list(last) == [4] and torch.equal(
            image_backbone.visual.attnpool(last[4]), image_backbone(images)
        )


def test_clip_timm_tower_goes_through_timm():
    torch.manual_seed(0)
    visual = TimmModel("test_resnet", embed_dim=16, image_size=64).eval()
    images = randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = visual_forward_intermediates(visual, images, [1, -1])
        assert list(feats) == [1, 4]
        ref = visual.trunk.forward_intermediates(images, indices=[1, 4], intermediates_only=True)
        assert torch.equal(feats[1], ref[0]) and torch.equal(feats[4], ref[1])
