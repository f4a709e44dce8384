"""``TextTower``: the open_clip text side as one module (token path = open_clip, deep copies are
independent) and prompt embeddings with or without a class name. Micro models, random init, CPU."""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from robustft.backbones.clip import CLIP_CONFIG_DIR, CLIPBackbone, PromptLearner, TextTower, freeze
from robustft.backbones.clip.text import text_parameters

MICRO = "robustft-micro-vit"
PROMPTS = ["a photo of a cat.", "dog", "a blurry photo of the big red truck on a road", ""]
TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_backbone(seed: int = 0) -> CLIPBackbone:
    torch.manual_seed(seed)
    return CLIPBackbone(MICRO).eval()


def micro_cfg() -> dict:
    return json.loads((CLIP_CONFIG_DIR / f"{MICRO}.json").read_text())


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return make_backbone().tokenize(PROMPTS)


# ---- token path = open_clip -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "custom_text, text_extra",
    [
        (False, {}),
        (False, {"proj_bias": True, "pool_type": "last"}),  # nn.Linear projection
        (True, {}),  # CustomTextCLIP: the parts live in model.text
        (True, {"pool_type": "eos", "eos_id": 49407, "ls_init_value": 0.1}),
        (True, {"no_causal_mask": True, "proj_type": "none"}),
    ],
    ids=[
        "clip",
        "clip-linear-proj-last",
        "custom-text",
        "custom-eos-layerscale",
        "custom-bidirectional-noproj",
    ],
)
def test_token_path_equals_open_clip_encode_text(custom_text, text_extra, tokens):
    cfg = micro_cfg()
    torch.manual_seed(0)
    cls = open_clip.model.CustomTextCLIP if custom_text else open_clip.model.CLIP
    model = cls(cfg["embed_dim"], cfg["vision_cfg"], {**cfg["text_cfg"], **text_extra}).eval()
    with torch.no_grad():  # non-trivial layer norms and projection
        for p in text_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    tower = TextTower.from_open_clip(model)
    assert {id(p) for p in tower.parameters()} == {id(p) for p in text_parameters(model)}  # a view, all parts
    with torch.no_grad():
        for normalize in (False, True):
            torch.testing.assert_close(
                tower.encode_tokens(tokens, normalize=normalize),
                model.encode_text(tokens, normalize=normalize),
                atol=1e-6,
                rtol=0,
            )
    assert tower.output_dim == model.encode_text(tokens[:1]).shape[-1]


def test_backbone_text_tower_is_an_unregistered_view(tokens):
    backbone = make_backbone()
    tower = backbone.text_tower
    assert tower is backbone.text_tower
    assert {id(p) for p in tower.parameters()} == {id(p) for p in text_parameters(backbone.model)}
    # the backbone's state dict keeps open_clip's keys only (checkpoints and weight averages unchanged)
    assert set(backbone.state_dict()) == {f"model.{k}" for k in backbone.model.state_dict()}
    assert set(tower.state_dict()) == {
        k for k in backbone.model.state_dict() if k.split(".")[0] in TEXT_PARTS
    }
    with torch.no_grad():
        assert torch.equal(tower(tokens, normalize=True), backbone.encode_text(tokens))
        # a model moved (here: cast) after the view was made: the mask buffer follows the tokens
        backbone.double()
        torch.testing.assert_close(
            tower.encode_tokens(tokens), backbone.model.encode_text(tokens), atol=1e-12, rtol=0
        )


def test_shrunk_context_tower_equals_open_clip():
    torch.manual_seed(0)
    backbone = CLIPBackbone(MICRO, context_length=8).eval()
    tokens = backbone.tokenize(["a photo of a cat.", "dog"])
    assert backbone.text_tower.context_length == 8 and tokens.shape == (2, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            backbone.text_tower.encode_tokens(tokens), backbone.model.encode_text(tokens), atol=1e-6, rtol=0
        )


# ---- deep copies are independent (CLIPN's "no" tower) ---------------------------------------------------


def test_deep_copy_trains_without_touching_the_original(tokens):
    backbone = freeze(make_backbone())
    yes = backbone.text_tower
    before = {name: p.detach().clone() for name, p in yes.named_parameters()}
    with torch.no_grad():
        reference = backbone.encode_text(tokens)

    no = copy.deepcopy(yes).requires_grad_(True)
    assert not {p.data_ptr() for p in no.parameters()} & {p.data_ptr() for p in backbone.parameters()}
    assert set(no.state_dict()) == set(yes.state_dict())
    with torch.no_grad():
        assert torch.equal(no.encode_tokens(tokens), yes.encode_tokens(tokens))

    optimizer = torch.optim.SGD(no.parameters(), lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        # push each "no" embedding away from its "yes" embedding (CLIPN's text semantic-opposite direction)
        loss = (no.encode_tokens(tokens, normalize=True) * reference).sum()
        loss.backward()
        optimizer.step()

    assert all(p.grad is None for p in backbone.parameters())
    for name, p in yes.named_parameters():
        assert torch.equal(p, before[name]), name
    changed = [name for name, p in no.named_parameters() if not torch.equal(p, before[name])]
    assert "ln_final.weight" in changed and any(n.startswith("transformer.") for n in changed)
    with torch.no_grad():
        assert torch.equal(backbone.encode_text(tokens), reference)
        assert (no.encode_tokens(tokens, normalize=True) * reference).sum() < (
            reference * reference
        ).sum() - 0.01  # the copy learned


# ---- prompt embeddings, with and without a class name ---------------------------------------------------


def test_prompts_without_class_name_train_only_the_context():
    backbone = freeze(make_backbone())
    learner = PromptLearner(backbone, None, n_ctx=4, n_prompts=3)
    assert [n for n, _ in learner.named_parameters()] == ["ctx"]
    assert learner.ctx.shape == (3, 4, 64) and learner.num_prompts == 3  # one context per prompt
    tok = backbone.tokenizer
    (dot,) = tok.encode(".")
    layout = [tok.sot_token_id, *tok.encode("X X X X"), dot, tok.eot_token_id]
    assert learner.tokenized_prompts[:, :7].tolist() == [layout] * 3
    assert learner.eot_indices.tolist() == [6, 6, 6]

    feats = learner()
    assert feats.shape == (3, 32)
    assert not torch.allclose(feats[0], feats[1])  # different contexts, different prompts
    (feats @ torch.randn(32, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert learner.ctx.grad is not None and (learner.ctx.grad.abs().sum(dim=(1, 2)) > 0).all()
    assert all(p.grad is None for p in backbone.parameters())


def test_prompts_without_class_name_equal_the_encoded_words():
    backbone = make_backbone()
    learner = PromptLearner(backbone, None, ctx_init="a photo of a", n_prompts=2)
    with torch.no_grad():
        ref = backbone.model.encode_text(backbone.tokenize(["a photo of a."] * 2))
        torch.testing.assert_close(learner(normalize=False), ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="n_prompts >= 1"):
        PromptLearner(backbone, None, n_ctx=4)
    with pytest.raises(ValueError, match="only for prompts without a class name"):
        PromptLearner(backbone, ["cat"], n_ctx=4, n_prompts=2)


def test_prompts_on_a_trained_tower_copy():
    backbone = freeze(make_backbone())
    no = copy.deepcopy(backbone.text_tower).requires_grad_(True)
    with torch.no_grad():
        no.ln_final.weight.mul_(1.5)
    learner = PromptLearner(backbone, ["cat", "dog"], ctx_init="a photo of a", tower=no)
    assert [n for n, _ in learner.named_parameters()] == ["ctx"]  # the tower is held, not owned
    feats = learner(normalize=False)
    with torch.no_grad():
        ref = no.encode_tokens(backbone.tokenize(["a photo of a cat.", "a photo of a dog."]))
        torch.testing.assert_close(feats, ref, atol=1e-6, rtol=0)
        assert not torch.allclose(
            feats, backbone.model.encode_text(backbone.tokenize(["a photo of a cat.", "a photo of a dog."]))
        )
    F.mse_loss(feats, torch.zeros_like(feats)).backward()
    assert learner.ctx.grad is not None and no.ln_final.weight.grad is not None
    assert all(p.grad is None for p in backbone.parameters())
