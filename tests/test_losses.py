"""Tests for robustft.losses: reductions to the standard losses and the CMA identity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from robustft.losses import contrastive_loss, mixup, smooth_labels, soft_cross_entropy

# Mathematically exact reductions are compared at float rounding level: F.cross_entropy with class
# indices sums the batch in a different order than any soft-target formulation, so bitwise equality
# is not attainable (and not meaningful) there.
TIGHT32 = {"rtol": 1e-6, "atol": 1e-6}
TIGHT64 = {"rtol": 1e-12, "atol": 1e-12}


def _batch(b: int = 16, k: int = 7, seed: int = 0, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, k, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, k, (b,), generator=gen)
    return logits, labels


# --------------------------------------------------------------------------------------------------
# label smoothing / soft cross-entropy


def test_smooth_labels_values():
    labels = torch.tensor([0, 2, 1, 2])
    assert torch.equal(smooth_labels(labels, 3, 0.0), F.one_hot(labels, 3).float())
    q = smooth_labels(labels, 3, 0.3)
    assert torch.allclose(q.sum(-1), torch.ones(4))
    assert torch.allclose(q[0], torch.tensor([0.8, 0.1, 0.1]))
    assert smooth_labels(labels, 3, 0.1, dtype=torch.float64).dtype == torch.float64
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="epsilon"):
            smooth_labels(labels, 3, bad)
    with pytest.raises(ValueError, match="integer"):
        smooth_labels(labels.float(), 3, 0.1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, TIGHT32), (torch.float64, TIGHT64)])
def test_no_smoothing_no_mixup_is_plain_cross_entropy(dtype, tol):
    logits, labels = _batch(dtype=dtype)
    images = torch.randn(16, 3, 4, 4, dtype=dtype)
    targets = smooth_labels(labels, 7, 0.0, dtype=dtype)
    mixed_images, mixed_targets, lam = mixup(images, targets, alpha=0.0)
    assert lam == 1.0 and mixed_images is images and mixed_targets is targets

    logits_a = logits.clone().requires_grad_()
    logits_b = logits.clone().requires_grad_()
    ours = soft_cross_entropy(logits_a, mixed_targets)
    ref = F.cross_entropy(logits_b, labels)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(logits_a.grad, logits_b.grad, **tol)


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.2, 1.0])
def test_soft_ce_with_smoothing_equals_torch_label_smoothing(eps):
    logits, labels = _batch(seed=3)
    ours = soft_cross_entropy(logits, smooth_labels(labels, 7, eps))
    torch.testing.assert_close(ours, F.cross_entropy(logits, labels, label_smoothing=eps), **TIGHT32)


def test_soft_ce_matches_torch_probability_targets_and_checks_shapes():
    logits, _ = _batch(seed=4)
    probs = torch.softmax(torch.randn(16, 7), dim=-1)
    torch.testing.assert_close(soft_cross_entropy(logits, probs), F.cross_entropy(logits, probs), **TIGHT32)
    with pytest.raises(ValueError, match="smooth_labels"):
        soft_cross_entropy(logits, torch.zeros(16, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# mixup


def test_mixup_negative_alpha_is_disabled():
    images, targets = torch.randn(4, 3), smooth_labels(torch.tensor([0, 1, 2, 0]), 3, 0.1)
    assert mixup(images, targets, alpha=-1.0) == (images, targets, 1.0)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_mixup_targets_and_images_are_consistent(alpha):
    b = 10
    gen = torch.Generator().manual_seed(int(alpha * 10))
    images = torch.randn(b, 3, 4, 4, generator=gen)
    targets = smooth_labels(torch.arange(b), b, 0.0)  # distinct labels: the permutation is recoverable
    mixed_images, mixed_targets, lam = mixup(images, targets, alpha, generator=gen)
    assert isinstance(lam, float) and 0.0 <= lam <= 1.0
    torch.testing.assert_close(mixed_targets.sum(-1), torch.ones(b))
    if 0.0 < lam < 1.0 and lam != 0.5:
        partner = [next((j for j in range(b) if j != i and mixed_targets[i, j] > 0), i) for i in range(b)]
        perm = torch.tensor(partner)
        assert sorted(partner) == list(range(b))
        torch.testing.assert_close(mixed_images, lam * images + (1 - lam) * images[perm])


def test_mixup_smoothed_targets_still_sum_to_one_and_are_reproducible():
    images = torch.randn(8, 3, 2, 2)
    targets = smooth_labels(torch.randint(0, 5, (8,)), 5, 0.1)
    out1 = mixup(images, targets, 0.5, generator=torch.Generator().manual_seed(11))
    out2 = mixup(images, targets, 0.5, generator=torch.Generator().manual_seed(11))
    assert out1[2] == out2[2] and torch.equal(out1[0], out2[0]) and torch.equal(out1[1], out2[1])
    torch.testing.assert_close(out1[1].sum(-1), torch.ones(8))
    torch.manual_seed(5)
    first = mixup(images, targets, 0.5)
    torch.manual_seed(5)
    assert mixup(images, targets, 0.5)[2] == first[2]


def test_mixup_lambda_distribution():
    gen = torch.Generator().manual_seed(0)
    lams = torch.tensor([mixup(torch.zeros(2, 1), torch.eye(2), 1.0, generator=gen)[2] for _ in range(400)])
    assert lams.min() >= 0 and lams.max() <= 1
    assert abs(float(lams.mean()) - 0.5) < 0.06  # Beta(1, 1) is uniform on [0, 1]
    assert 0.05 < float((lams < 0.25).float().mean()) < 0.45


def test_mixup_rejects_hard_labels():
    with pytest.raises(TypeError, match="smooth_labels"):
        mixup(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), 0.5)
    with pytest.raises(ValueError, match="batch sizes"):
        mixup(torch.randn(4, 3), torch.eye(3), 0.5)


# --------------------------------------------------------------------------------------------------
# contrastive (FLYP / CMA)


def _features(b: int = 12, d: int = 16, seed: int = 0, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=gen, dtype=dtype), torch.randn(b, d, generator=gen, dtype=dtype)


def _clip_loss(image: Tensor, text: Tensor, scale: Tensor | float) -> Tensor:
    """The standard symmetric CLIP loss written with F.cross_entropy."""
    logits_per_image = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def _cma_direct(image: Tensor, text: Tensor, scale: Tensor | float, lam: float) -> Tensor:
    """CMA written term by term from the spec: ½(CE_img + λR_img) + ½(CE_txt + λR_txt)."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(image.shape[0])
    ce_img, ce_txt = F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)
    r_img = -torch.logsumexp(logits, dim=1).mean()
    r_txt = -torch.logsumexp(logits, dim=0).mean()
    return 0.5 * (ce_img + lam * r_img) + 0.5 * (ce_txt + lam * r_txt)


@pytest.mark.parametrize("seed", range(3))
def test_lambda_zero_is_exactly_the_clip_loss(seed):
    image, text = _features(seed=seed)
    scale = torch.tensor(100.0)
    assert torch.equal(contrastive_loss(image, text, scale), _clip_loss(image, text, scale))
    assert torch.equal(contrastive_loss(image, text, 14.3, lam=0.0), _clip_loss(image, text, 14.3))


@pytest.mark.parametrize("lam", [1e-3, 0.1, 0.3, 0.9])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_scaled_log_partition_identity(lam, scale):
    image, text = _features(seed=int(lam * 1000) % 7, dtype=torch.float64)
    torch.testing.assert_close(
        contrastive_loss(image, text, scale, lam), _cma_direct(image, text, scale, lam), rtol=0, atol=1e-6
    )
    image32, text32 = image.float(), text.float()
    torch.testing.assert_close(
        contrastive_loss(image32, text32, scale, lam),
        _cma_direct(image32, text32, scale, lam),
        rtol=1e-6,
        atol=1e-5,
    )


def test_identity_holds_for_gradients_too():
    image, text = _features(dtype=torch.float64)
    inputs_a = [image.clone().requires_grad_(), text.clone().requires_grad_(), torch.tensor(50.0).double()]
    inputs_a[2].requires_grad_()
    inputs_b = [t.detach().clone().requires_grad_() for t in inputs_a]
    contrastive_loss(*inputs_a, lam=0.2).backward()
    _cma_direct(*inputs_b, lam=0.2).backward()
    for a, b in zip(inputs_a, inputs_b, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)


def test_small_lambda_is_continuous_with_the_exact_zero_path():
    image, text = _features(seed=5)
    torch.testing.assert_close(
        contrastive_loss(image, text, 100.0, lam=1e-12),
        contrastive_loss(image, text, 100.0),
        rtol=0,
        atol=1e-6,
    )


def test_duplicate_labels_are_fine():
    classes = torch.tensor([0, 1, 0, 2, 1, 1])
    gen = torch.Generator().manual_seed(0)
    class_text = torch.randn(3, 8, generator=gen)
    image = torch.randn(6, 8, generator=gen).requires_grad_()
    text = class_text[classes].clone().requires_grad_()  # repeated classes -> identical text rows
    scale = torch.tensor(100.0, requires_grad=True)
    loss = contrastive_loss(image, text, scale, lam=1e-3)
    loss.backward()
    assert torch.isfinite(loss)
    for grad in (image.grad, text.grad, scale.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(loss, _cma_direct(image, text, scale, 1e-3), rtol=1e-6, atol=1e-5)


def _multi_positive_direct(image: Tensor, text: Tensor, scale: float, lam: float, ids: Tensor) -> Tensor:
    """UniCL targets written per row: mean over the row's positives of -z_kj, plus (1-λ)·logsumexp."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    total = 0.0
    for z in (logits, logits.T):
        rows = []
        for k in range(len(ids)):
            positives = [j for j in range(len(ids)) if ids[j] == ids[k]]
            rows.append(-z[k, positives].mean() + (1 - lam) * torch.logsumexp(z[k], dim=0))
        total = total + 0.5 * torch.stack(rows).mean()
    return total


@pytest.mark.parametrize("lam", [0.0, 1e-3, 0.3])
def test_class_positives_match_a_per_row_reference(lam):
    image, text = _features(dtype=torch.float64)
    ids = torch.tensor([0, 1, 0, 2, 1, 1, 3, 3, 3, 4, 0, 2])
    torch.testing.assert_close(
        contrastive_loss(image, text, 30.0, lam, match_ids=ids), _multi_positive_direct(image, text, 30.0, lam, ids),
        rtol=0, atol=1e-10,
    )


@pytest.mark.parametrize("lam", [0.0, 1e-3])
def test_all_distinct_ids_are_the_diagonal_loss(lam):
    image, text = _features(dtype=torch.float64)
    torch.testing.assert_close(
        contrastive_loss(image, text, 50.0, lam, match_ids=torch.arange(12).flip(0)),
        contrastive_loss(image, text, 50.0, lam), rtol=0, atol=1e-12,
    )


def test_class_positives_change_nothing_when_captions_of_a_class_are_identical():
    """With one caption per class, a repeated class gives identical text rows, and the diagonal loss then
    already equals the multi-positive one (why UniCL targets only matter with several templates)."""
    classes = torch.tensor([0, 1, 0, 2, 1, 1, 2, 0])
    gen = torch.Generator().manual_seed(3)
    image = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    text = torch.randn(3, 8, generator=gen, dtype=torch.float64)[classes]
    torch.testing.assert_close(
        contrastive_loss(image, text, 40.0, match_ids=classes), contrastive_loss(image, text, 40.0), rtol=0, atol=1e-12
    )
    other_text = text + 0.1 * torch.randn(8, 8, generator=gen, dtype=torch.float64)  # distinct templates
    assert not torch.allclose(
        contrastive_loss(image, other_text, 40.0, match_ids=classes), contrastive_loss(image, other_text, 40.0)
    )


def test_features_are_normalised_inside():
    image, text = _features(seed=2)
    base = contrastive_loss(image, text, 100.0, lam=0.1)
    torch.testing.assert_close(contrastive_loss(3 * image, 0.5 * text, 100.0, lam=0.1), base, **TIGHT32)


def test_contrastive_input_checks():
    image, text = _features()
    with pytest.raises(ValueError, match="lam"):
        contrastive_loss(image, text, 100.0, lam=-0.1)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        contrastive_loss(image, text[:5], 100.0)
    with pytest.raises(ValueError, match="match_ids"):
        contrastive_loss(image, text, 100.0, match_ids=torch.arange(5))
