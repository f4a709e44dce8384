"""CLIPBackbone / PromptTextEncoder / PromptLearner on the random-init micro config (CPU, offline)."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustft.backbones.base import PreprocessConfig
from robustft.backbones.clip import (
    CLIP_CONFIG_DIR,
    CLIPBackbone,
    PromptLearner,
    PromptTextEncoder,
    freeze,
    register_clip_configs,
    vit_global_and_local,
)

MICRO = "robustft-micro-vit"
PROMPTS = ["a photo of a cat.", "dog", "a blurry photo of the big red truck on a road", ""]


def make_backbone(seed: int = 0, name: str = MICRO, **kwargs) -> CLIPBackbone:
    torch.manual_seed(seed)
    return CLIPBackbone(name, **kwargs).eval()


@pytest.fixture(scope="module")
def backbone() -> CLIPBackbone:
    return make_backbone()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def micro_cfg() -> dict:
    return json.loads((CLIP_CONFIG_DIR / f"{MICRO}.json").read_text())


# ---- configs --------------------------------------------------------------------------------------


def test_configs_registered_idempotently():
    paths = open_clip.factory._MODEL_CONFIG_PATHS
    before = len(paths)
    names = register_clip_configs()
    register_clip_configs()
    assert len(paths) == before
    assert {"robustft-micro-vit", "robustft-tiny-vit"} <= set(names) <= set(open_clip.list_models())


def test_backbone_attributes(backbone):
    assert backbone.preprocess == PreprocessConfig(
        32, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, "bicubic"
    )
    assert backbone.embed_dim == backbone.feature_dim == 32
    assert backbone.context_length == 16
    assert torch.allclose(backbone.logit_scale, torch.tensor(1 / 0.07))


# ---- text tower replay ----------------------------------------------------------------------------


def test_prompt_text_encoder_reproduces_encode_text(backbone):
    encoder = PromptTextEncoder(backbone)
    assert list(encoder.parameters()) == [] and encoder.state_dict() == {}
    tokens = backbone.tokenize(PROMPTS)
    embeddings, eot = encoder.embed_tokens(tokens)
    assert torch.equal(eot, tokens.argmax(dim=-1))
    with torch.no_grad():
        for normalize in (False, True):
            ours = encoder(embeddings, eot, normalize=normalize)
            ref = backbone.model.encode_text(tokens, normalize=normalize)
            torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(backbone.encode_text(PROMPTS), F.normalize(ref, dim=-1), atol=1e-6, rtol=0)


def test_tokenize_overflow_error_names_text_and_length(backbone):
    long_text = "a photo of " + "very " * 20 + "small cat"
    with pytest.raises(ValueError, match=r"context length 16") as info:
        backbone.tokenize(["fine", long_text])
    assert repr(long_text) in str(info.value)
    assert backbone.tokenize([long_text], truncate=True).shape == (1, 16)
    # 14 words + start + end fill the context exactly: no error
    assert backbone.tokenize(["cat " * 14]).shape == (1, 16)


# ---- local features -------------------------------------------------------------------------------


def naive_value_path_local(visual, images):
    """Independent MaskCLIP value path for default open_clip blocks (nn.MultiheadAttention)."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    blocks = list(visual.transformer.resblocks)
    for blk in blocks[:-1]:
        x = blk(x)
    last = blocks[-1]
    width = x.shape[-1]
    q_k_v_weight, q_k_v_bias = last.attn.in_proj_weight, last.attn.in_proj_bias
    v = last.ln_1(x) @ q_k_v_weight[2 * width :].T + q_k_v_bias[2 * width :]
    v = x + last.ls_1(v @ last.attn.out_proj.weight.T + last.attn.out_proj.bias)
    v = v + last.ls_2(last.mlp(last.ln_2(v)))
    return visual.ln_post(v)[:, 1:] @ visual.proj


def identity_attention_local(visual, images):
    """Second reference: the last block run normally but with attention restricted to the token itself."""
    x = visual._embeds(images)
    blocks = list(visual.transformer.resblocks)
    for blk in blocks[:-1]:
        x = blk(x)
    n = x.shape[1]
    diagonal_only = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
    x = blocks[-1](x, attn_mask=diagonal_only)
    return visual.ln_post(x)[:, 1:] @ visual.proj


def test_encode_image_with_local(backbone, images):
    with torch.no_grad():
        glob, local = backbone.encode_image_with_local(images)
        assert torch.equal(glob, backbone.encode_image(images))
        assert local.shape == (3, (32 // 8) ** 2, 32)
        torch.testing.assert_close(local.norm(dim=-1), torch.ones(3, 16))
        raw_glob, raw_local = backbone.encode_image_with_local(images, normalize=False)
        assert torch.equal(raw_glob, backbone.model.encode_image(images))
        visual = backbone.model.visual
        torch.testing.assert_close(raw_local, naive_value_path_local(visual, images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(raw_local, identity_attention_local(visual, images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "extra",
    [
        {"ls_init_value": 0.3},
        {"ls_init_value": 0.3, "scale_heads": True, "scale_attn_inner": True, "scale_attn": True},
        {"qk_norm": True, "scale_fc": True},
        {"pool_type": "avg", "final_ln_after_pool": True},
    ],
    ids=["layer-scale", "custom-block", "qk-norm", "avg-pool"],
)
def test_local_features_on_tower_variants(extra, images):
    torch.manual_seed(0)
    vision = {**micro_cfg()["vision_cfg"], **extra}
    visual = open_clip.model._build_vision_tower(32, vision).eval()
    if extra.get("scale_heads"):
        with torch.no_grad():
            visual.transformer.resblocks[-1].attn.head_scale.uniform_(0.5, 1.5)
    with torch.no_grad():
        glob, local = vit_global_and_local(visual, images)
        assert torch.equal(glob, visual(images))
        assert local.shape == (3, 16, 32)
        torch.testing.assert_close(local, identity_attention_local(visual, images), atol=1e-5, rtol=1e-5)
        if "ls_init_value" in extra and len(extra) == 1:
            torch.testing.assert_close(local, naive_value_path_local(visual, images), atol=1e-5, rtol=1e-5)


def test_local_features_reject_other_towers():
    with pytest.raises(NotImplementedError, match="VisionTransformer"):
        vit_global_and_local(nn.Linear(3, 3), torch.zeros(1, 3))


# ---- zero-shot classifier cache -------------------------------------------------------------------


def test_text_classifier_recipe_and_cache(monkeypatch):
    backbone = make_backbone()
    names, templates = ["cat", "dog", "car"], ["a photo of a {}.", "a {}", "itap of the {}."]
    calls = []
    original = backbone.encode_text

    def counting(tokens, normalize=True):
        calls.append(len(tokens))
        return original(tokens, normalize=normalize)

    monkeypatch.setattr(backbone, "encode_text", counting)
    weights = backbone.text_classifier(names, templates)
    assert weights.shape == (3, 32) and not weights.requires_grad
    with torch.no_grad():
        per_template = original([t.format(c) for c in names for t in templates]).view(3, 3, -1)
    torch.testing.assert_close(weights, F.normalize(per_template.mean(1), dim=-1), atol=1e-6, rtol=0)
    n_calls = len(calls)

    assert backbone.text_classifier(names, templates) is weights  # cached: nothing computed
    assert len(calls) == n_calls
    backbone.text_classifier(names[:2], templates)  # another key is computed
    assert len(calls) > n_calls

    n_calls = len(calls)
    backbone.invalidate_text_cache()
    backbone.text_classifier(names, templates)
    assert len(calls) > n_calls

    n_calls = len(calls)
    with torch.no_grad():  # an in-place update of a text parameter (like an optimizer step)
        backbone.model.ln_final.weight.mul_(1.0)
    backbone.text_classifier(names, templates)
    assert len(calls) > n_calls
    n_calls = len(calls)
    with torch.no_grad():  # image-tower updates keep the cache
        backbone.model.visual.proj.mul_(1.0)
    backbone.text_classifier(names, templates)
    assert len(calls) == n_calls


# ---- CoOp prompt learner --------------------------------------------------------------------------


def test_prompt_learner_gradients_reach_only_ctx():
    backbone = freeze(make_backbone())
    names = ["cat", "dog", "pickup truck"]
    for class_specific in (False, True):
        learner = PromptLearner(backbone, names, n_ctx=4, class_specific=class_specific)
        assert [n for n, _ in learner.named_parameters()] == ["ctx"]
        assert learner.ctx.shape == ((3, 4, 64) if class_specific else (4, 64))
        feats = learner()
        assert feats.shape == (3, 32)
        (feats @ torch.randn(32)).sum().backward()
        assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
        assert all(p.grad is None for p in backbone.parameters())


def test_prompt_learner_with_real_words_equals_encode_text():
    backbone = make_backbone()
    names = ["cat", "aquarium fish", "maple tree"]
    learner = PromptLearner(backbone, names, ctx_init="a photo of a")
    assert learner.n_ctx == 4
    with torch.no_grad():
        ref = backbone.model.encode_text(backbone.tokenize([f"a photo of a {n}." for n in names]))
        torch.testing.assert_close(learner(normalize=False), ref, atol=1e-6, rtol=0)
        csc = PromptLearner(backbone, names, ctx_init="a photo of a", class_specific=True)
        torch.testing.assert_close(csc(normalize=False), ref, atol=1e-6, rtol=0)


def test_prompt_learner_overflow_names_the_prompt(backbone):
    with pytest.raises(ValueError, match="context length 16"):
        PromptLearner(backbone, ["cat", "very long class name " * 3], n_ctx=4)


# ---- weights: local files, prefixes, mismatches, names and tags ------------------------------------


def test_local_state_dict_round_trip(tmp_path, backbone, images):
    path = tmp_path / "micro.pt"
    torch.save(backbone.model.state_dict(), path)
    loaded = make_backbone(seed=123, pretrained=str(path))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), backbone.encode_image(images))
        assert torch.equal(loaded.encode_text(PROMPTS), backbone.encode_text(PROMPTS))


def test_lightning_checkpoint_prefix(tmp_path, backbone, images):
    state = {f"clip.model.{k}": v for k, v in backbone.model.state_dict().items()}
    state["head.weight"] = torch.zeros(3, 32)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    loaded = make_backbone(seed=7, pretrained=str(path))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), backbone.encode_image(images))

    state.update({f"teacher.{k}": v for k, v in state.items() if k.startswith("clip.")})
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match="Ambiguous key prefix"):
        make_backbone(pretrained=str(path))
    loaded = make_backbone(seed=7, pretrained=str(path), prefix="teacher.clip.model.")
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), backbone.encode_image(images))


def test_mismatching_weights_name_keys(tmp_path):
    tiny = make_backbone(name="robustft-tiny-vit")
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    with pytest.raises(ValueError, match="do not match") as info:
        make_backbone(pretrained=str(path))
    message = str(info.value)
    assert "unexpected keys: transformer.resblocks.2." in message  # tiny has 3 text layers, micro 2
    assert "shape mismatches: ln_final.bias: checkpoint (128,) vs model (64,)" in message

    state = make_backbone().model.state_dict()
    del state["ln_final.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys: ln_final\.bias.*unexpected keys: extra\.weight"):
        make_backbone(pretrained=str(path))


def test_shorter_context_keeps_the_first_positions(tmp_path, backbone):
    path = tmp_path / "micro.pt"
    torch.save(backbone.model.state_dict(), path)
    short = make_backbone(pretrained=str(path), context_length=8)
    assert short.context_length == 8 and short.tokenize(["a cat"]).shape == (1, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            short.encode_text(["a photo of a cat."]), backbone.encode_text(["a photo of a cat."])
        )
    with pytest.raises(ValueError, match="exceeds the 16 text positions"):
        make_backbone(pretrained=str(path), context_length=32)
    assert make_backbone(context_length=24).context_length == 24  # random init: any length


def test_local_dir(tmp_path, backbone, images):
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": micro_cfg(), "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    )
    torch.save(backbone.model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    loaded = CLIPBackbone(f"local-dir:{tmp_path}").eval()
    assert loaded.preprocess.mean == (0.5, 0.5, 0.5) and loaded.preprocess.std == (0.25, 0.25, 0.25)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), backbone.encode_image(images))
    with pytest.raises(ValueError, match="cannot be combined"):
        CLIPBackbone(f"local-dir:{tmp_path}", pretrained="openai")


def test_unknown_model_name_lists_close_matches():
    with pytest.raises(ValueError, match="Unknown open_clip model") as info:
        CLIPBackbone("robustft-micro-vt")
    assert "'robustft-micro-vit'" in str(info.value)
    with pytest.raises(ValueError, match="'ViT-B-16'"):
        CLIPBackbone("vit-b-16")


def test_unknown_tag_lists_tags():
    with pytest.raises(ValueError, match=r"Available tags: .*'openai'.*local weights file path"):
        CLIPBackbone("ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(ValueError, match="Unknown pretrained tag 'laion' .*Available tags: none"):
        CLIPBackbone(MICRO, pretrained="laion")
