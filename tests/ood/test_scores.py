"""Tests for robustft.ood.scores: each score against an independent naive implementation, invariants,
error messages, tuning and a separability sanity check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_auc_score

from robustft.ood.scores import (
    SCORES,
    ASHScore,
    FeatureScore,
    KNNScore,
    MSPScore,
    OODScore,
    ash,
    build_score,
    check_score_requirements,
    percentile,
    tune_score,
)

K, D, N, B = 5, 16, 120, 30
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(N, D, generator=g).abs() + 0.1 * torch.arange(D)  # post-ReLU-like
    query = torch.randn(B, D, generator=g).abs() * 1.3
    weight = torch.randn(K, D, generator=g) * 0.5
    bias = torch.randn(K, generator=g)
    labels = torch.arange(N) % K
    ref = {"features": feats, "logits": feats @ weight.T + bias, "labels": labels}
    out = {"features": query, "logits": query @ weight.T + bias}
    return ref, out, (weight, bias)


def np_(x: torch.Tensor) -> np.ndarray:
    return x.double().numpy()


def close(actual: torch.Tensor, expected) -> None:
    np.testing.assert_allclose(actual.double().numpy(), np.asarray(expected, dtype=np.float64), **TOL)


def fitted(name, ref, head, **hp):
    score = build_score(name, **hp)
    score.fit(ref, head)
    return score


# ------------------------------------------------------------------------------------------------
# against naive references


def test_msp_maxlogit_energy_match_numpy(data):
    _, out, _ = data
    logits = np_(out["logits"])
    close(build_score("msp")(out), [max(softmax(row)) for row in logits])
    close(build_score("maxlogit")(out), [max(row) for row in logits])
    close(build_score("mls")(out), logits.max(axis=1))
    for t in (1.0, 0.5, 7.0):
        close(build_score("energy", temperature=t)(out), t * logsumexp(logits / t, axis=1))
    close(build_score("ebo")(out), logsumexp(logits, axis=1))


@pytest.mark.parametrize(("gamma", "m"), [(0.1, 100), (0.5, 3), (2.0, 1)])
def test_gen_matches_loop(data, gamma, m):
    _, out, _ = data
    expected = []
    for row in np_(out["logits"]):
        p = sorted(softmax(row), reverse=True)[:m]
        expected.append(-sum(pi**gamma * (1 - pi) ** gamma for pi in p))
    close(build_score("gen", gamma=gamma, M=m)(out), expected)


@pytest.mark.parametrize("k", [1, 7, 50, N, 10_000])
def test_knn_matches_bruteforce(data, k):
    ref, out, _ = data
    bank = np_(ref["features"])
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    q = np_(out["features"])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    dists = np.sqrt(((q[:, None, :] - bank[None, :, :]) ** 2).sum(-1))
    kk = min(k, N)
    expected = [-sorted(row)[kk - 1] for row in dists]
    close(fitted("knn", ref, None, k=k)(out), expected)


def test_knn_chunked_scan_equals_single_pass(data, monkeypatch):
    ref, out, _ = data
    full = fitted("knn", ref, None, k=9)(out)
    monkeypatch.setattr(KNNScore, "max_chunk_elements", 7)  # chunk = k rows: many merges
    close(fitted("knn", ref, None, k=9)(out), full.numpy())


def _numpy_mahalanobis(ref, query):
    feats, labels = np_(ref["features"]), ref["labels"].numpy()
    classes = sorted(set(labels.tolist()))
    means = {c: feats[labels == c].mean(axis=0) for c in classes}
    centered = np.concatenate([feats[labels == c] - means[c] for c in classes])
    prec = np.linalg.inv(EmpiricalCovariance(assume_centered=True).fit(centered).covariance_)
    dist = np.array([[(x - means[c]) @ prec @ (x - means[c]) for c in classes] for x in query])
    return dist


def test_mds_matches_numpy(data):
    ref, out, _ = data
    dist = _numpy_mahalanobis(ref, np_(out["features"]))
    close(fitted("mds", ref, None)(out), -dist.min(axis=1))


def test_rmds_matches_numpy(data):
    ref, out, _ = data
    query = np_(out["features"])
    dist = _numpy_mahalanobis(ref, query)
    bg = EmpiricalCovariance().fit(np_(ref["features"]))
    mu0, prec0 = bg.location_, np.linalg.inv(bg.covariance_)
    d0 = np.array([(x - mu0) @ prec0 @ (x - mu0) for x in query])
    close(fitted("rmds", ref, None)(out), (-(dist - d0[:, None])).max(axis=1))


def test_mds_uses_only_present_classes_and_pinv_for_singular_covariance():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(6, 10, generator=g)  # N < D: singular covariance
    ref = {"features": feats, "labels": torch.tensor([2, 2, 7, 7, 7, 2])}
    score = fitted("mds", ref, None)
    assert score.classes.tolist() == [2, 7]
    s = score({"features": feats})
    assert torch.isfinite(s).all()
    # training points lie in the span of the covariance: distance to own mean is finite and small
    assert (s <= 1e-6).all()


@pytest.mark.parametrize("dim", [4, 8])
def test_vim_matches_official_numpy_recipe(data, dim):
    ref, out, (weight, bias) = data
    w, b = np_(weight), np_(bias)
    train, query = np_(ref["features"]), np_(out["features"])
    u = -np.linalg.pinv(w) @ b
    cov = EmpiricalCovariance(assume_centered=True).fit(train - u).covariance_
    eig_vals, eig_vecs = np.linalg.eig(cov)
    ns = np.ascontiguousarray(eig_vecs.T[np.argsort(eig_vals * -1)[dim:]].T)
    alpha = (train @ w.T + b).max(axis=-1).mean() / np.linalg.norm((train - u) @ ns, axis=-1).mean()
    expected = logsumexp(query @ w.T + b, axis=-1) - alpha * np.linalg.norm((query - u) @ ns, axis=-1)
    score = fitted("vim", ref, (weight, bias), dim=dim)
    close(score(out), expected)
    assert score.alpha == pytest.approx(alpha, rel=1e-6)


def test_vim_default_dim_rule():
    from robustft.ood.scores import ViMScore

    assert ViMScore.default_dim(2048) == 1000
    assert ViMScore.default_dim(1536) == 1000
    assert ViMScore.default_dim(768) == 512
    assert ViMScore.default_dim(512) == 256
    assert ViMScore.default_dim(16) == 8
    ref = {"features": torch.randn(40, 16)}
    score = fitted("vim", ref, (torch.randn(3, 16), torch.randn(3)))
    assert score.dim_ == 8
    with pytest.raises(ValueError, match="dim"):
        fitted("vim", ref, (torch.randn(3, 16), torch.randn(3)), dim=16)


@pytest.mark.parametrize("p", [50.0, 90.0, 99.0])
def test_react_matches_numpy(data, p):
    ref, out, (weight, bias) = data
    c = np.percentile(np_(ref["features"]).flatten(), p)
    logits = np.clip(np_(out["features"]), None, c) @ np_(weight).T + np_(bias)
    score = fitted("react", ref, (weight, bias), percentile=p)
    assert score.threshold == pytest.approx(c, rel=1e-6)
    close(score(out), logsumexp(logits, axis=1))


def test_percentile_matches_numpy():
    x = torch.randn(7, 13, generator=torch.Generator().manual_seed(1))
    for q in (0, 3.3, 25, 50, 90, 99.9, 100):
        assert percentile(x, q) == pytest.approx(np.percentile(x.numpy().astype(np.float64), q), abs=1e-6)


def _ash_loop(row: list[float], p: float, variant: str) -> list[float]:
    d = len(row)
    k = max(1, d - int(np.round(d * p / 100.0)))
    order = sorted(range(d), key=lambda i: -row[i])[:k]
    s1, s2 = sum(row), sum(row[i] for i in order)
    out = [0.0] * d
    for i in order:
        out[i] = {"ash_p": row[i], "ash_b": s1 / k, "ash_s": row[i] * math.exp(s1 / s2)}[variant]
    return out


@pytest.mark.parametrize("variant", ["ash_s", "ash_p", "ash_b"])
@pytest.mark.parametrize("p", [0.0, 50.0, 65.0, 90.0, 100.0])
def test_ash_transform_tiny_per_sample(variant, p):
    x = torch.tensor([[0.5, 3.0, 0.0, 1.0, 2.0, 0.25, 4.0], [1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.1]])
    expected = [_ash_loop(row, p, variant) for row in x.tolist()]
    close(ash(x, p, variant), expected)


@pytest.mark.parametrize("variant", ["ash_s", "p", "ash_b"])
def test_ash_score_is_energy_of_shaped_features(data, variant):
    ref, out, (weight, bias) = data
    shaped = np.array(
        [_ash_loop(row, 90.0, ASHScore(variant=variant).variant) for row in np_(out["features"])]
    )
    expected = logsumexp(shaped @ np_(weight).T + np_(bias), axis=1)
    score = build_score("ash", variant=variant)
    score.fit({}, (weight, bias))
    close(score(out), expected)


# ------------------------------------------------------------------------------------------------
# invariants


def test_msp_range(data):
    _, out, _ = data
    s = build_score("msp")({"logits": out["logits"] * 10})
    assert ((s >= 1.0 / K - 1e-7) & (s <= 1.0 + 1e-7)).all()
    uniform = build_score("msp")({"logits": torch.zeros(3, K)})
    close(uniform, [1.0 / K] * 3)


def test_energy_temperature_limits(data):
    _, out, _ = data
    logits = out["logits"].double()
    t = 1e4
    hot = build_score("energy", temperature=t)({"logits": logits})
    # T log K + mean(logits) + var(logits) / (2T) + O(1/T^2)
    np.testing.assert_allclose((hot - t * math.log(K)).numpy(), logits.mean(dim=1).numpy(), atol=1e-3)
    cold = build_score("energy", temperature=1e-3)({"logits": logits})
    np.testing.assert_allclose(cold.numpy(), logits.amax(dim=1).numpy(), atol=1e-2)


def test_react_at_100_equals_energy(data):
    ref, _, (weight, bias) = data
    query = {"features": ref["features"][:40]}  # never above the training maximum
    react = fitted("react", ref, (weight, bias), percentile=100)
    energy = build_score("energy")({"logits": query["features"] @ weight.T + bias})
    close(react(query), energy.numpy())


def test_scores_keep_batch_shape_dtype_and_need_no_grad(data):
    ref, out, head = data
    feats = out["features"].clone().requires_grad_(True)
    outputs = {"features": feats, "logits": feats @ head[0].T + head[1]}
    for name in SCORES.names():
        if not SCORES.get(name).requires <= outputs.keys():
            continue  # CLIP scores (mcm, glmcm, neglabel) read cosines: tests/ood/test_clip_scores.py
        s = fitted(name, ref, head)(outputs)
        assert s.shape == (B,) and s.dtype == torch.float32 and not s.requires_grad, name
        empty = fitted(name, ref, head)({k: v[:0].detach() for k, v in outputs.items()})
        assert empty.shape == (0,), name
    s64 = fitted("mds", ref, head)({"features": out["features"].double()})
    assert s64.dtype == torch.float64


# ------------------------------------------------------------------------------------------------
# errors


def test_unfitted_score_raises(data):
    _, out, _ = data
    for name in ("knn", "mds", "rmds", "vim", "react", "ash"):
        with pytest.raises(RuntimeError, match="not fitted"):
            build_score(name)(out)
    with pytest.raises(ValueError, match="head"):
        build_score("ash").fit({}, None)
    with pytest.raises(ValueError, match="labels"):
        build_score("mds").fit({"features": torch.randn(4, 3)})


def test_unknown_name_suggests_close_match():
    with pytest.raises(KeyError, match="Did you mean 'energy'"):
        build_score("enrgy")


def test_unknown_hyperparameter_names_it_and_valid_ones():
    with pytest.raises(TypeError, match=r"'kk'.*valid: 'k'"):
        build_score("knn", kk=5)
    with pytest.raises(TypeError, match=r"'T'.*valid: 'temperature'"):
        build_score("energy", T=2)
    with pytest.raises(TypeError, match="takes none"):
        build_score("msp", temperature=2)
    with pytest.raises(TypeError, match="takes none"):
        MSPScore(foo=1)
    with pytest.raises(ValueError, match="variant"):
        build_score("ash", variant="ash_x")


def test_check_score_requirements_messages():
    knn = build_score("knn")
    with pytest.raises(ValueError) as err:
        check_score_requirements(knn, {"logits"}, has_head=True)
    assert str(err.value) == (
        "score 'knn' needs outputs {'features'} but the method provides {'logits'}; "
        "pick another score or a method that exposes features, "
        "or read another output with model.score_kwargs: {knn: {feature_key: <key>}}"
    )
    with pytest.raises(ValueError, match="a method that exposes logits$"):
        check_score_requirements(build_score("msp"), {"features"}, has_head=False)
    with pytest.raises(ValueError, match="head"):
        check_score_requirements(build_score("vim"), {"features", "logits"}, has_head=False)
    check_score_requirements(build_score("msp"), {"logits"}, has_head=False)
    check_score_requirements(build_score("react"), {"features"}, has_head=True)


def test_score_classes_declare_the_contract():
    for name in SCORES.names():
        cls = SCORES.get(name)
        assert issubclass(cls, OODScore) and cls.requires, name
        for key, values in cls.search_space.items():
            assert key in cls.hyperparameters() and values, name
    needs_fit = {n for n in SCORES.names() if SCORES.get(n).needs_fit}
    needs_head = {n for n in SCORES.names() if SCORES.get(n).needs_head}
    assert needs_fit == {"knn", "mds", "rmds", "vim", "react", "mahalanobis_global"}
    assert needs_head == {"vim", "react", "ash"}
    assert build_score("knn").hparams == {"k": 50, "feature_key": "features"}
    assert build_score("ash").hparams == {"percentile": 90.0, "variant": "ash_s", "feature_key": "features"}
    assert build_score("mds").hparams == {"feature_key": "features"}
    assert build_score("gen").hparams == {"gamma": 0.1, "M": 100}
    assert build_score("react").percentile == 90.0


# ------------------------------------------------------------------------------------------------
# tuning


def _auroc(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return float(roc_auc_score(y, np.r_[id_scores.numpy(), ood_scores.numpy()]))


def _knn_tuning_case():
    """Bank: a big ID cluster (100 points) + a 3-point contamination where the OOD-val set sits.
    k=1 cannot separate (both have a close first neighbour); k in [4, 100] separates; k=bank size cannot."""
    g = torch.Generator().manual_seed(5)
    a, o = torch.zeros(8), torch.zeros(8)
    a[0], o[1] = 1.0, 1.0
    bank = torch.cat([a + 0.01 * torch.randn(100, 8, generator=g), o + 0.01 * torch.randn(3, 8, generator=g)])
    id_val = {"features": a + 0.01 * torch.randn(20, 8, generator=g)}
    ood_val = {"features": o + 0.01 * torch.randn(20, 8, generator=g)}
    return {"features": bank}, id_val, ood_val


def test_tune_score_picks_the_clearly_best_value(monkeypatch):
    ref, id_val, ood_val = _knn_tuning_case()
    monkeypatch.setattr(KNNScore, "search_space", {"k": [1, 10, 1000]})
    best, value = tune_score("knn", id_val, ood_val, ref, None, _auroc)
    assert best == {"k": 10} and value == 1.0


def test_tune_score_default_grid_is_capped_at_bank_size():
    ref, id_val, ood_val = _knn_tuning_case()
    assert KNNScore.search_grid(ref)["k"] == [1, 10, 20, 50, 100, 103]
    best, value = tune_score("knn", id_val, ood_val, ref, None, _auroc)
    assert best == {"k": 10} and value == 1.0  # first of the tied best values


def test_tune_score_without_grid_and_with_fixed(data):
    ref, out, head = data
    ood = {k: v + 3.0 for k, v in out.items() if k == "features"}
    best, value = tune_score("msp", out, {"logits": -out["logits"]}, None, None, _auroc)
    assert best == {} and 0.0 <= value <= 1.0
    best, _ = tune_score("ash", out, ood, None, head, _auroc, fixed={"variant": "ash_p"})
    assert best["variant"] == "ash_p" and best["percentile"] in ASHScore.search_space["percentile"]
    with pytest.raises(ValueError, match="reference"):
        tune_score("knn", out, ood, None, None, _auroc)


# ------------------------------------------------------------------------------------------------
# separability sanity check


def test_every_score_separates_gaussian_clusters():
    """ID: post-ReLU features around class means (class c active on its own block of 6 dimensions);
    OOD: equal weak activity on every class block (low confidence) and strong activity on 8 dimensions
    no ID sample uses (far from every class)."""
    g = torch.Generator().manual_seed(0)
    n_cls, block, dim = 4, 6, 32
    means = torch.zeros(n_cls, dim)
    for c in range(n_cls):
        means[c, c * block : (c + 1) * block] = 3.0

    def id_samples(n):
        y = torch.arange(n) % n_cls
        return (means[y] + 0.5 * torch.randn(n, dim, generator=g)).clamp_min(0), y

    train, labels = id_samples(400)
    id_test, _ = id_samples(200)
    ood_mean = means.mean(dim=0)
    ood_mean[n_cls * block :] = 3.0
    ood_test = (ood_mean + 0.5 * torch.randn(200, dim, generator=g)).clamp_min(0)
    weight, bias = (means > 0).float() * 0.3, torch.zeros(n_cls)

    def pack(x):
        return {"features": x, "logits": x @ weight.T + bias}

    ref = {**pack(train), "labels": labels}
    configs = [(name, {}) for name in SCORES.names() if SCORES.get(name).requires <= {"features", "logits"}]
    configs += [("ash", {"variant": "ash_p"}), ("ash", {"variant": "ash_b"})]
    aurocs = {}
    for name, hp in configs:
        score = fitted(name, ref, (weight, bias), **hp)
        aurocs[f"{name}{hp or ''}"] = _auroc(score(pack(id_test)), score(pack(ood_test)))
    print(aurocs)
    assert all(v > 0.9 for v in aurocs.values()), aurocs


# ------------------------------------------------------------------------------------------------
# feature_key: feature scores read any [N, D] output


FEATURE_SCORES = ("knn", "mds", "rmds", "vim", "react", "ash", "mahalanobis_global")


@pytest.fixture(scope="module")
def two_keys(data):
    """'features' and 'embedding' hold different tensors of the same width (so the head fits both)."""
    ref, out, head = data
    g = torch.Generator().manual_seed(7)
    emb_ref = torch.randn(N, D, generator=g).abs() * 2.0 + 0.3 * torch.arange(D).flip(0)
    emb_out = torch.randn(B, D, generator=g).abs() * 1.7
    ref2 = {"features": ref["features"], "embedding": emb_ref, "labels": ref["labels"]}
    out2 = {"features": out["features"], "embedding": emb_out}
    return ref2, out2, head


def test_every_feature_score_takes_feature_key():
    assert {n for n in SCORES.names() if issubclass(SCORES.get(n), FeatureScore)} == set(FEATURE_SCORES)
    for name in FEATURE_SCORES:
        assert SCORES.get(name).hyperparameters()["feature_key"] == "features", name
        score = build_score(name, feature_key="embedding")
        assert score.requires == {"embedding"} and score.feature_key == "embedding", name
        assert "features" not in score.reference_requires, name
        assert SCORES.get(name).requires == {"features"}, name  # the class default is untouched
    assert build_score("mds", feature_key="embedding").reference_requires == {"embedding", "labels"}


@pytest.mark.parametrize("name", FEATURE_SCORES)
def test_feature_score_with_feature_key_reads_that_output(two_keys, name):
    ref, out, head = two_keys
    keyed = fitted(name, ref, head, feature_key="embedding")
    # the same score computed directly on the embedding, stored under the default key
    direct = fitted(name, {"features": ref["embedding"], "labels": ref["labels"]}, head)
    expected = direct({"features": out["embedding"]})
    close(keyed(out), expected.numpy())
    # nothing reads 'features': it may be absent from the outputs and the reference
    alone = fitted(name, {"embedding": ref["embedding"], "labels": ref["labels"]}, head, feature_key="embedding")
    close(alone({"embedding": out["embedding"]}), expected.numpy())
    # and the default score does read 'features', which differs here
    on_features = fitted(name, ref, head)(out)
    assert not torch.allclose(on_features, expected, atol=1e-3), name


def test_knn_and_mds_on_embedding_match_bruteforce(two_keys):
    ref, out, _ = two_keys
    bank = np_(ref["embedding"])
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    q = np_(out["embedding"])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    dists = np.sqrt(((q[:, None, :] - bank[None, :, :]) ** 2).sum(-1))
    close(fitted("knn", ref, None, k=7, feature_key="embedding")(out), [-sorted(row)[6] for row in dists])
    maha = _numpy_mahalanobis({"features": ref["embedding"], "labels": ref["labels"]}, np_(out["embedding"]))
    close(fitted("mds", ref, None, feature_key="embedding")(out), -maha.min(axis=1))


def test_missing_feature_key_is_named_by_every_check(two_keys):
    ref, out, head = two_keys
    knn = build_score("knn", feature_key="embedding")
    with pytest.raises(ValueError) as err:
        check_score_requirements(knn, {"features", "logits"}, has_head=False)
    assert str(err.value).startswith(
        "score 'knn' needs outputs {'embedding'} but the method provides {'features', 'logits'}; "
        "pick another score or a method that exposes embedding"
    )
    check_score_requirements(knn, {"embedding", "logits"}, has_head=False)
    with pytest.raises(ValueError, match=r"'mds' is fitted on ID training outputs \{'embedding', 'labels'\}"):
        build_score("mds", feature_key="embedding").fit({"features": ref["features"], "labels": ref["labels"]})
    knn.fit(ref)
    with pytest.raises(KeyError, match=r"needs outputs \{'embedding'\}"):
        knn({"features": out["features"]})
    with pytest.raises(ValueError, match="'vim' needs outputs {'layer3'}"):
        check_score_requirements(build_score("vim", feature_key="layer3"), {"features"}, has_head=True)


def test_feature_key_validation():
    with pytest.raises(ValueError, match="reserved"):
        build_score("knn", feature_key="labels")
    with pytest.raises(ValueError, match="non-empty"):
        build_score("mds", feature_key="")
    with pytest.raises(ValueError, match=r"'embedding' must be a \[N, D\] tensor"):
        fitted("knn", {"embedding": torch.randn(4, 2, 3)}, None, feature_key="embedding")


def test_feature_key_is_never_tuned(monkeypatch):
    for name in SCORES.names():
        assert "feature_key" not in SCORES.get(name).search_space, name
    with pytest.raises(TypeError, match="must not tune 'feature_key'"):
        type("Bad", (FeatureScore,), {"search_space": {"feature_key": ["features", "embedding"]}})
    with pytest.raises(TypeError, match="keyword-only 'feature_key'"):

        class NoKey(FeatureScore):
            def __init__(self, *, k: int = 1) -> None:
                super().__init__()

    # tuning with feature_key held fixed: the grid and every candidate read the embedding
    bank, id_val, ood_val = _knn_tuning_case()
    junk = torch.randn(2, 8)  # 2 rows: a grid read from 'features' would be capped at k <= 2
    ref = {"embedding": bank["features"], "features": junk}
    id2 = {"embedding": id_val["features"], "features": -id_val["features"]}
    ood2 = {"embedding": ood_val["features"], "features": id_val["features"]}
    assert KNNScore.search_grid(ref, fixed={"feature_key": "embedding"})["k"] == [1, 10, 20, 50, 100, 103]
    assert KNNScore.search_grid(ref)["k"] == [1, 2]
    best, value = tune_score("knn", id2, ood2, ref, None, _auroc, fixed={"feature_key": "embedding"})
    assert best == {"feature_key": "embedding", "k": 10} and value == 1.0


def test_method_score_kwargs_feature_key_is_checked_against_output_keys():
    from robustft.methods.base import OODMethod

    class EmbeddingMethod(OODMethod):
        keys = {"logits", "embedding"}

        def output_keys(self) -> set[str]:
            return set(self.keys)

    method = EmbeddingMethod(num_classes=3, scores=["knn"], score_kwargs={"knn": {"feature_key": "embedding"}})
    (knn,) = method.build_scores().values()
    assert knn.requires == {"embedding"} and knn.hparams == {"k": 50, "feature_key": "embedding"}
    EmbeddingMethod.keys = {"logits", "features"}
    with pytest.raises(ValueError, match="needs outputs {'embedding'}"):
        method.build_scores()
