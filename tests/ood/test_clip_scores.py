"""MCM, GL-MCM and NegLabel (robustft.ood.clip_scores) against naive re-implementations and their properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustft.ood.clip_scores import GLMCMScore, MCMScore, NegLabelScore
from robustft.ood.scores import SCORES, build_score, check_score_requirements


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


@pytest.fixture(scope="module")
def clip_outputs() -> dict[str, torch.Tensor]:
    """Cosines of 7 images (global + 5 patches) with 4 ID labels and 23 negative labels, 16-d embeddings."""
    images, patches = _unit(7, 16, seed=0), _unit(7, 5, 16, seed=1)
    ids, negs = _unit(4, 16, seed=2), _unit(23, 16, seed=3)
    return {
        "image": images,
        "neg_text": negs,
        "cosine": images @ ids.T,
        "local_cosine": patches @ ids.T,
        "neg_cosine": images @ negs.T,
    }


# ---- naive references (loops, math module) --------------------------------------------------------


def naive_mcm(cos: torch.Tensor, t: float) -> list[float]:
    out = []
    for row in cos.tolist():
        exps = [math.exp(c / t) for c in row]
        out.append(max(e / sum(exps) for e in exps))
    return out


def naive_glmcm(cos: torch.Tensor, local: torch.Tensor, t: float, lam: float) -> list[float]:
    glob = naive_mcm(cos, t)
    out = []
    for b in range(cos.shape[0]):
        out.append(glob[b] + lam * max(naive_mcm(local[b], t)))
    return out


def naive_neglabel(cos: torch.Tensor, neg: torch.Tensor, t: float, groups: list[list[int]]) -> list[float]:
    out = []
    for b in range(cos.shape[0]):
        vals = []
        for group in groups:
            id_exp = [math.exp(c / t) for c in cos[b].tolist()]
            neg_exp = [math.exp(neg[b, j].item() / t) for j in group]
            vals.append(sum(id_exp) / (sum(id_exp) + sum(neg_exp)))
        out.append(sum(vals) / len(vals))
    return out


# ---- registry ---------------------------------------------------------------------------------------


def test_registered_and_requirements():
    assert SCORES.get("mcm") is MCMScore and SCORES.get("glmcm") is GLMCMScore and SCORES.get("neglabel") is NegLabelScore
    assert MCMScore.hyperparameters() == {"temperature": 1.0}
    assert GLMCMScore.hyperparameters() == {"temperature": 1.0, "lambda_local": 1.0}
    assert NegLabelScore.hyperparameters() == {"temperature": 0.01, "ngroup": 1, "seed": 0}
    with pytest.raises(ValueError, match="neg_cosine"):
        check_score_requirements(NegLabelScore(), {"logits", "cosine"}, has_head=False)
    with pytest.raises(KeyError, match="local_cosine"):
        GLMCMScore()({"cosine": torch.zeros(2, 3)})
    with pytest.raises(TypeError, match="lambda_local"):
        build_score("glmcm", lam=0.5)


# ---- MCM --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1.0, 0.1])
def test_mcm_matches_naive(clip_outputs, t):
    got = MCMScore(temperature=t)(clip_outputs)
    assert got.dtype == torch.float64
    assert torch.allclose(got, torch.tensor(naive_mcm(clip_outputs["cosine"], t), dtype=torch.float64), atol=1e-12)


def test_mcm_bounds_and_class_order(clip_outputs):
    cos = clip_outputs["cosine"].float()
    k = cos.shape[1]
    for t in (1.0, 0.01):
        s = MCMScore(temperature=t)({"cosine": cos})
        assert s.dtype == torch.float32
        assert (s >= 1 / k - 1e-7).all() and (s <= 1 + 1e-7).all()
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(MCMScore()({"cosine": cos[:, perm]}), MCMScore()({"cosine": cos}))
    # equal cosines for every class give exactly 1/K; one dominant class gives ~1
    assert torch.allclose(MCMScore()({"cosine": torch.full((1, k), 0.3)}), torch.tensor([1 / k]))
    peaked = torch.tensor([[1.0] + [-1.0] * (k - 1)])
    assert MCMScore(temperature=0.01)({"cosine": peaked}).item() == pytest.approx(1.0)


# ---- GL-MCM -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "lam"), [(1.0, 1.0), (1.0, 0.5), (0.1, 0.3)])
def test_glmcm_matches_naive_and_decomposes(clip_outputs, t, lam):
    got = GLMCMScore(temperature=t, lambda_local=lam)(clip_outputs)
    ref = naive_glmcm(clip_outputs["cosine"], clip_outputs["local_cosine"], t, lam)
    assert torch.allclose(got, torch.tensor(ref, dtype=torch.float64), atol=1e-12)
    # GL-MCM = MCM + λ · (local term); the local term is an MCM over patches, maximised over patches
    local_term = torch.stack([MCMScore(temperature=t)({"cosine": p}).max() for p in clip_outputs["local_cosine"]])
    assert torch.allclose(got, MCMScore(temperature=t)(clip_outputs) + lam * local_term, atol=1e-12)
    assert torch.allclose(GLMCMScore(lambda_local=0.0)(clip_outputs), MCMScore()(clip_outputs))


def test_glmcm_shape_check(clip_outputs):
    with pytest.raises(ValueError, match="local_cosine"):
        GLMCMScore()({"cosine": clip_outputs["cosine"], "local_cosine": clip_outputs["local_cosine"][:, :, :2]})


# ---- NegLabel ---------------------------------------------------------------------------------------


def test_neglabel_matches_naive_ungrouped(clip_outputs):
    n = clip_outputs["neg_cosine"].shape[1]
    for t in (0.01, 0.1):
        got = NegLabelScore(temperature=t)(clip_outputs)
        ref = naive_neglabel(clip_outputs["cosine"], clip_outputs["neg_cosine"], t, [list(range(n))])
        assert torch.allclose(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-10, atol=1e-300)
        # the definition: softmax over [ID ; negatives], probability mass on the ID part
        full = torch.cat([clip_outputs["cosine"], clip_outputs["neg_cosine"]], dim=1) / t
        assert torch.allclose(got, full.softmax(dim=1)[:, :4].sum(dim=1), rtol=1e-10)


def test_neglabel_grouped_matches_naive(clip_outputs):
    n = clip_outputs["neg_cosine"].shape[1]  # 23 negatives, 4 groups of 5, 3 dropped
    score = NegLabelScore(temperature=0.1, ngroup=4)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    assert score.permutation(n).tolist() == perm
    groups = [perm[g * 5 : (g + 1) * 5] for g in range(4)]
    ref = naive_neglabel(clip_outputs["cosine"], clip_outputs["neg_cosine"], 0.1, groups)
    got = score(clip_outputs)
    assert torch.allclose(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-10)
    # the permutation is fixed: the same batch split in two gives the same scores
    halves = [score({k: v[sl] for k, v in clip_outputs.items()}) for sl in (slice(0, 3), slice(3, 7))]
    assert torch.equal(torch.cat(halves), got)
    # another seed regroups the negatives
    assert not torch.allclose(NegLabelScore(temperature=0.1, ngroup=4, seed=1)(clip_outputs), got)


def test_neglabel_grouped_equals_ungrouped_with_one_group(clip_outputs):
    a = NegLabelScore(ngroup=1)(clip_outputs)
    b = NegLabelScore(ngroup=1, seed=123)(clip_outputs)
    assert torch.equal(a, b)
    # more groups than negatives: one negative per group (clipped), still finite and in (0, 1]
    c = NegLabelScore(temperature=0.1, ngroup=1000)(clip_outputs)
    per_negative = [[j] for j in range(clip_outputs["neg_cosine"].shape[1])]
    ref = naive_neglabel(clip_outputs["cosine"], clip_outputs["neg_cosine"], 0.1, per_negative)
    assert torch.allclose(c, torch.tensor(ref, dtype=torch.float64), rtol=1e-10)


def test_neglabel_range_and_zero_negatives(clip_outputs):
    for t in (0.01, 1.0):
        s = NegLabelScore(temperature=t)({k: v.float() for k, v in clip_outputs.items()})
        assert s.dtype == torch.float32 and (s > 0).all() and (s <= 1).all()
    empty = {"cosine": clip_outputs["cosine"], "neg_cosine": clip_outputs["neg_cosine"][:, :0]}
    assert torch.equal(NegLabelScore()(empty), torch.ones(7, dtype=torch.float64))
    assert torch.equal(NegLabelScore(ngroup=10)(empty), torch.ones(7, dtype=torch.float64))


def test_neglabel_lowered_by_negative_identical_to_image(clip_outputs):
    before = NegLabelScore(temperature=0.1)(clip_outputs)
    image = clip_outputs["image"]
    # add image 2's own embedding as a negative label: its cosine with that negative is 1
    extra = image @ image[2]
    after = NegLabelScore(temperature=0.1)(
        {"cosine": clip_outputs["cosine"], "neg_cosine": torch.cat([clip_outputs["neg_cosine"], extra[:, None]], dim=1)}
    )
    assert after[2] < 0.5 * before[2]
    assert (after <= before).all()  # adding a negative never raises a score


def test_scores_follow_input_device_and_dtype(clip_outputs):
    half = {k: v.half() for k, v in clip_outputs.items()}
    for score in (MCMScore(), GLMCMScore(), NegLabelScore(ngroup=3)):
        out = score(half)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_scores_keep_batch_shape_and_need_no_grad(clip_outputs):
    outputs = {k: v.float().clone().requires_grad_(True) for k, v in clip_outputs.items()}
    for name in ("mcm", "glmcm", "neglabel"):
        s = build_score(name)(outputs)
        assert s.shape == (7,) and s.dtype == torch.float32 and not s.requires_grad, name
        empty = build_score(name)({k: v[:0].detach() for k, v in outputs.items()})
        assert empty.shape == (0,), name


def test_scores_separate_aligned_from_unaligned_images():
    """ID images lie close to one ID label embedding, OOD images close to none (but near a negative label)."""
    ids, negs = _unit(5, 32, seed=10), _unit(40, 32, seed=11)
    labels = torch.arange(200) % 5
    id_img = F.normalize(ids[labels] + 0.6 * _unit(200, 32, seed=12), dim=-1)
    ood_img = F.normalize(negs[torch.arange(200) % 40] + 0.6 * _unit(200, 32, seed=13), dim=-1)
    id_patch = F.normalize(id_img[:, None] + 0.5 * _unit(200, 4, 32, seed=14), dim=-1)
    ood_patch = F.normalize(ood_img[:, None] + 0.5 * _unit(200, 4, 32, seed=15), dim=-1)

    def pack(img, patch):
        return {"cosine": img @ ids.T, "local_cosine": patch @ ids.T, "neg_cosine": img @ negs.T}

    for name, hp in [("mcm", {}), ("glmcm", {}), ("neglabel", {}), ("neglabel", {"ngroup": 4})]:
        score = build_score(name, **hp)
        a, b = score(pack(id_img, id_patch)), score(pack(ood_img, ood_patch))
        auroc = (a[:, None] > b[None, :]).double().mean() + 0.5 * (a[:, None] == b[None, :]).double().mean()
        assert auroc > 0.9, (name, hp, float(auroc))
