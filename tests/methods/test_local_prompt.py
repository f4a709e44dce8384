"""Local-Prompt: the spec's CPU-checkable properties (methods-ood-detection.md section 2(g)) and the real CLI.

- freezing: only the local/negative prompt contexts get gradients; CLIP and the global prompt stay bitwise;
- view selection: positives = top-``num_pos`` similarity to the true class, negative = argmin;
- the vectorised ``L_pos`` / ``L_neg`` equal naive loops over prompts and regions, for the configured
  ``train_topk`` only (the official ``$10`` top-k bug would fail it), and are invariant to a logit shift;
- bounds: ``L_pos, L_neg >= 0``, ``L_div = M/(M-1)`` for identical prompts, lower when pushed apart, and
  computed on the *negative* prompts (the March 2025 fix);
- regional score: in (0, 1), lowered by a negative prompt equal to the strongest local feature, a
  top-k-mean local MCM without negative prompts;
- direction: a few steps pull the negative prompts towards the negative views' regions;
- manual optimisation: one optimizer step per positive view (or one per batch);
- a micro 1-shot ``fit`` through the real CLI, then ``evaluate`` of its checkpoint against a stored report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from micro_cli import assert_matches_expected_report

from robustft.backbones.clip import PromptLearner
from robustft.cli import main
from robustft.methods.base import ConfigMismatchError
from robustft.methods.local_prompt import LocalPrompt
from robustft.methods.local_prompt.ops import (
    diversity_loss,
    negative_local_loss,
    positive_local_loss,
    regional_probabilities,
    regional_topk_values,
    select_views,
)
from robustft.ood.clip_scores import glmcm, mcm
from robustft.ood.report import compare_reports

REPO = Path(__file__).resolve().parents[2]
EXPECTED_REPORT = REPO / "tests" / "expected" / "local_prompt_micro_report.json"
MICRO = "robustft-micro-vit"
NAMES = ["airplane", "automobile", "bird", "cat", "deer"]  # K = 5
SMALL = {"n_ctx": 4, "n_neg_prompts": 8, "num_pos": 2, "train_topk": 4, "eval_top_k": 4}


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> object:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def micro(seed: int = 0, **kwargs) -> LocalPrompt:
    torch.manual_seed(seed)
    args = {"class_names": NAMES, **SMALL, **kwargs}
    return LocalPrompt(MICRO, **args)


def _views(b: int = 3, v: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(b, v, 3, 32, 32, generator=g), "label": torch.randint(0, 5, (b,), generator=g)}


# ---- independent naive references (loops over images, prompts and regions) ----------------------------


def naive_topr(column: list[float], k: int) -> list[int]:
    return sorted(range(len(column)), key=lambda r: -column[r])[:k]


def naive_lpos(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, k: int, t: float) -> float:
    total = 0.0
    for i in range(a.shape[0]):
        ai, bi, y = a[i].double().tolist(), b[i].double().tolist(), int(labels[i])
        col = lambda m, j: [m[r][j] for r in range(len(m))]  # noqa: E731
        num = sum(math.exp(ai[r][y] / t) for r in naive_topr(col(ai, y), k))
        den = sum(math.exp(ai[r][c] / t) for c in range(a.shape[2]) for r in naive_topr(col(ai, c), k))
        den += sum(math.exp(bi[r][m] / t) for m in range(b.shape[2]) for r in naive_topr(col(bi, m), k))
        total += -math.log(num / den)
    return total / a.shape[0]


def naive_lneg(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, k: int, t: float) -> float:
    total = 0.0
    for i in range(a.shape[0]):
        ai, bi, y = a[i].double().tolist(), b[i].double().tolist(), int(labels[i])
        col = lambda m, j: [m[r][j] for r in range(len(m))]  # noqa: E731
        regions = naive_topr(col(ai, y), k)
        num = sum(math.exp(bi[r][m] / t) for r in regions for m in range(b.shape[2]))
        den = num + sum(math.exp(ai[r][c] / t) for c in range(a.shape[2]) for r in naive_topr(col(ai, c), k))
        total += -math.log(num / den)
    return total / a.shape[0]


def _logits(seed: int = 0, b: int = 3, r: int = 16, k: int = 5, m: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, r, k, generator=g) * 3, torch.randn(b, r, m, generator=g) * 3, torch.randint(0, k, (b,), generator=g)


# ==================================================================================================
# 1. freezing
# ==================================================================================================


def test_only_the_prompt_contexts_train_and_clip_and_global_prompt_stay_bitwise() -> None:
    model = micro()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"local_prompts.ctx", "neg_prompts.ctx"}
    assert model.local_prompts.ctx.shape == (5, 4, 64) and model.neg_prompts.ctx.shape == (8, 4, 64)
    assert abs(float(model.neg_prompts.ctx.std()) - 0.02) < 0.005  # N(0, 0.02) init
    clip_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    global_before = model.global_text_features().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = _views()
    ctx_before = model.local_prompts.ctx.detach().clone()
    for _ in range(3):
        losses = model.training_losses(batch)
        model.total_loss(losses).backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        assert model.local_prompts.ctx.grad.abs().sum() > 0 and model.neg_prompts.ctx.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(model.local_prompts.ctx, ctx_before)
    assert all(torch.equal(v, clip_before[k]) for k, v in model.backbone.state_dict().items())
    assert torch.equal(model.global_text_features(), global_before)


# ==================================================================================================
# 2. view selection
# ==================================================================================================


def test_view_selection_on_a_stubbed_similarity() -> None:
    sim = torch.tensor([[0.1, 0.9, 0.3, -0.2, 0.5], [0.7, -0.5, 0.0, 0.8, 0.2]])
    positives, negative = select_views(sim, 2)
    assert positives.shape == (2, 2) and negative.shape == (1, 2)
    assert positives.T.tolist() == [[1, 4], [3, 0]]
    assert negative.tolist() == [[3, 1]]
    with pytest.raises(ValueError, match="num_pos"):
        select_views(sim, 5)


def test_views_are_selected_by_the_frozen_global_prompt_of_the_true_class() -> None:
    model = micro().eval()
    batch = _views(b=3, v=4)
    pos_local, neg_local, positives = model.encode_views(batch["image"], batch["label"])
    with torch.no_grad():
        for i in range(3):
            glob, local = model.backbone.encode_image_with_local(batch["image"][i])  # the 4 views of image i
            sim = glob @ model.global_text_features()[batch["label"][i]]
            order = sim.argsort(descending=True)
            assert positives[:, i].tolist() == order[:2].tolist()
            torch.testing.assert_close(pos_local[:, i], local[order[:2]], atol=1e-5, rtol=0)
            torch.testing.assert_close(neg_local[i], local[order[-1]], atol=1e-5, rtol=0)


# ==================================================================================================
# 3. loss equivalence and the top-k argument
# ==================================================================================================


@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("t", [1.0, 0.5])
def test_vectorised_losses_equal_naive_loops(k: int, t: float) -> None:
    a, b, y = _logits()
    a, b = a.double(), b.double()  # float64: the losses are small differences of log-sums
    assert positive_local_loss(a, b, y, k, t).item() == pytest.approx(naive_lpos(a, b, y, k, t), rel=1e-9)
    assert negative_local_loss(a, b, y, k, t).item() == pytest.approx(naive_lneg(a, b, y, k, t), rel=1e-9)


def test_losses_are_invariant_to_a_constant_logit_shift() -> None:
    a, b, y = _logits(seed=1)
    for fn in (positive_local_loss, negative_local_loss):
        ref = fn(a, b, y, 4)
        shifted = fn(a + 5000.0, b + 5000.0, y, 4)  # a plain exp() would overflow to inf/inf
        assert torch.isfinite(shifted) and shifted.item() == pytest.approx(ref.item(), abs=1e-3)


def test_the_configured_train_topk_is_the_one_in_the_loss() -> None:
    """The official scripts/train.sh read --topk as `$10` (= `${1}0`), silently training with another k.
    Here the model's own loss must equal the naive loss with ITS train_topk, and differ for other k."""
    model = micro(train_topk=3)
    g = torch.Generator().manual_seed(2)
    pos, neg = F.normalize(torch.randn(2, 16, 32, generator=g), dim=-1), F.normalize(torch.randn(2, 16, 32, generator=g), dim=-1)
    y = torch.tensor([1, 4])
    with torch.no_grad():
        losses = model.view_losses(pos, neg, y)
        ell, negp = model.prompt_features()
        s = float(model.backbone.logit_scale)
    for k in (3, 2, 8):
        expected_pos = naive_lpos(s * pos @ ell.T, s * pos @ negp.T, y, k, 1.0)
        expected_neg = 5.0 * naive_lneg(s * neg @ ell.T, s * neg @ negp.T, y, k, 1.0)
        same = losses["local_pos"].item() == pytest.approx(expected_pos, rel=1e-4) and \
            losses["local_neg"].item() == pytest.approx(expected_neg, rel=1e-4)
        assert same == (k == 3), k
    with pytest.raises(ValueError, match="train_topk.*R = 16"):
        micro(train_topk=50).view_losses(pos, neg, y)


# ==================================================================================================
# 4. bounds and the diversity term
# ==================================================================================================


def test_loss_bounds_and_diversity_values() -> None:
    for seed in range(5):
        a, b, y = _logits(seed=seed)
        assert positive_local_loss(a, b, y, 4) >= 0 and negative_local_loss(a, b, y, 4) >= 0
    same = torch.randn(1, 32).repeat(8, 1)
    assert diversity_loss(same).item() == pytest.approx(8 / 7, rel=1e-6)
    spread = same + 0.5 * torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    assert diversity_loss(spread) < diversity_loss(same)
    assert diversity_loss(torch.eye(8, 32)).item() == pytest.approx(8 / 56, rel=1e-6)  # orthogonal: diagonal only


def test_diversity_is_on_the_negative_prompts_not_the_class_prompts() -> None:
    """Commit c785aba (2025-03-20) moved L_div from the class local prompts to the negative prompts."""
    model = micro(lambda_neg=0.0)
    pos = F.normalize(torch.randn(2, 16, 32), dim=-1)
    losses = model.view_losses(pos, pos, torch.tensor([0, 1]))
    _, neg = model.prompt_features()
    torch.testing.assert_close(losses["neg_div"], 0.5 * diversity_loss(neg))
    losses["neg_div"].backward()
    assert model.local_prompts.ctx.grad is None  # the class prompts get nothing from L_div
    assert model.neg_prompts.ctx.grad.abs().sum() > 0


# ==================================================================================================
# 5. regional score
# ==================================================================================================


def _local(seed: int = 0, b: int = 4, r: int = 16, e: int = 32) -> torch.Tensor:
    return F.normalize(torch.randn(b, r, e, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_regional_score_properties() -> None:
    local = _local()
    g = torch.Generator().manual_seed(1)
    ell, neg = F.normalize(torch.randn(5, 32, generator=g), dim=-1), F.normalize(torch.randn(8, 32, generator=g), dim=-1)
    probs = regional_probabilities(local @ ell.T, local @ neg.T)
    s_r = regional_topk_values(probs, 10).mean(1)
    assert ((s_r > 0) & (s_r < 1)).all()
    # brute force: the softmax over ID and negative prompts, ID entries, top 10 pairs
    for i in range(4):
        vals = []
        for r in range(16):
            z = sum(math.exp(float(local[i, r] @ p)) for p in [*ell, *neg])
            vals += [math.exp(float(local[i, r] @ ell[c])) / z for c in range(5)]
        assert s_r[i].item() == pytest.approx(sum(sorted(vals)[-10:]) / 10, rel=1e-5)
    # a negative prompt equal to each image's strongest local feature lowers that image's score
    for i in range(4):
        strongest = int(probs[i].amax(dim=1).argmax())
        neg_plus = torch.cat([neg, local[i, strongest].unsqueeze(0)])
        lowered = regional_topk_values(regional_probabilities(local[i : i + 1] @ ell.T, local[i : i + 1] @ neg_plus.T), 10).mean()
        assert lowered < s_r[i]
    # no negative prompts: a top-k-mean local MCM; k = 1 is GL-MCM's local term
    none = regional_probabilities(local @ ell.T, local.new_zeros(4, 16, 0))
    torch.testing.assert_close(none, (local @ ell.T).softmax(-1))
    cos = torch.randn(4, 5)
    local_term = glmcm(cos, local @ ell.T) - mcm(cos)
    torch.testing.assert_close(regional_topk_values(none, 1).mean(1), local_term)


def test_forward_eval_scores_equal_an_independent_computation() -> None:
    model = micro(eval_top_k=6).eval()
    images = _views(b=3, v=1)["image"][:, 0]
    with torch.no_grad():
        out = model.forward_eval({"image": images})
        glob, local = model.backbone.encode_image_with_local(images)
        ell, neg = model.local_prompts(), model.neg_prompts()
    text = model.global_text_features()
    torch.testing.assert_close(out["cosine"], glob @ text.T)
    probs = regional_probabilities(local @ ell.T, local @ neg.T)
    s_r = probs.flatten(1).sort(dim=1, descending=True).values[:, :6].mean(1)
    scores = model.ood_scores(out)
    torch.testing.assert_close(scores["regional_mcm"], s_r)
    torch.testing.assert_close(scores["local_prompt"], mcm(glob @ text.T) + s_r)
    # local-aware classification: argmax_c exp(cos(z,t_c)) * mean_{top-6 r} exp(cos(r, l_c))
    top = (local @ ell.T).topk(6, dim=1).values.exp().mean(1)
    assert torch.equal(out["logits"].argmax(1), ((glob @ text.T).exp() * top).argmax(1))
    assert set(out) == model.output_keys()  # local_cosine for the default glmcm score


def test_a_trained_global_prompt_can_be_plugged_in_at_inference(tmp_path: Path) -> None:
    model = micro().eval()
    images = _views(b=2, v=1)["image"][:, 0]
    coop = PromptLearner(model.backbone, NAMES, n_ctx=4)
    with torch.no_grad():
        before = model.forward_eval({"image": images})
        model.set_global_prompt(coop)
        after = model.forward_eval({"image": images})
        glob = model.backbone.encode_image(images)
        features = coop()
    torch.testing.assert_close(after["cosine"], glob @ features.T)
    assert not torch.allclose(before["cosine"], after["cosine"])
    torch.testing.assert_close(after["regional_topk"], before["regional_topk"])  # local prompts unchanged
    path = tmp_path / "coop.pt"
    torch.save(features, path)
    torch.manual_seed(0)
    from_file = micro(global_prompt=str(path)).eval()
    torch.testing.assert_close(from_file.global_text_features(), features)
    with pytest.raises(ValueError, match="global_prompt"):
        model.set_global_prompt(torch.zeros(5, 7))


# ==================================================================================================
# 6. direction of training
# ==================================================================================================


def test_training_pulls_negative_prompts_to_the_negative_views() -> None:
    """Negative views carry a distinctive pattern (their regions cluster around one direction): a few
    steps raise cos(region, n_m) on negative-view regions relative to positive-view regions, and raise
    L_pos's num/den ratio."""
    model = micro(lambda_div=0.0)
    g = torch.Generator().manual_seed(3)
    e = 32
    pattern = F.normalize(torch.randn(e, generator=g), dim=0)
    pos = F.normalize(torch.randn(4, 16, e, generator=g), dim=-1)
    neg = F.normalize(pattern + 0.3 * torch.randn(4, 16, e, generator=g), dim=-1)
    y = torch.tensor([0, 1, 2, 3])

    def state() -> tuple[float, float]:
        with torch.no_grad():
            _, n = model.prompt_features()
            gap = float((neg @ n.T).mean() - (pos @ n.T).mean())
            return gap, math.exp(-float(model.view_losses(pos, neg, y)["local_pos"]))

    gap0, ratio0 = state()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    for _ in range(15):
        model.total_loss(model.view_losses(pos, neg, y)).backward()
        optimizer.step()
        optimizer.zero_grad()
    gap1, ratio1 = state()
    assert gap1 > gap0 + 0.05 and ratio1 > ratio0


# ==================================================================================================
# 7. manual optimisation
# ==================================================================================================


@pytest.mark.parametrize(("step_per", "expected"), [("view", 3), ("batch", 1)])
def test_one_optimizer_step_per_positive_view(step_per: str, expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = micro(num_pos=3, step_per=step_per)
    assert model.automatic_optimization is False
    seen: list[set[str]] = []
    monkeypatch.setattr(model, "manual_step", lambda losses, batch_size=None: seen.append(set(losses)) or torch.zeros(()))
    model.training_step(_views(b=2, v=5), 0)
    assert len(seen) == expected and all(s == {"local_pos", "local_neg", "neg_div"} for s in seen)


def test_batch_step_is_the_mean_of_the_per_view_losses() -> None:
    model = micro(num_pos=2)
    batch = _views(b=3, v=4)
    with torch.no_grad():
        mean = model.training_losses(batch)
        pos_local, neg_local, _ = model.encode_views(batch["image"], batch["label"])
        per_view = [model.view_losses(v, neg_local, batch["label"]) for v in pos_local]
    for term in mean:
        torch.testing.assert_close(mean[term], sum(p[term] for p in per_view) / 2)


# ==================================================================================================
# errors
# ==================================================================================================


def test_bad_configuration_is_named() -> None:
    with pytest.raises(ValueError, match="n_neg_prompts is 1 but lambda_div"):
        micro(n_neg_prompts=1)
    with pytest.raises(ValueError, match="step_per"):
        micro(step_per="epoch")
    model = micro()
    with pytest.raises(ConfigMismatchError, match="data.n_views"):
        model.training_losses({"image": torch.randn(2, 3, 32, 32), "label": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="num_pos.*data.n_views"):
        micro(num_pos=4).training_losses(_views(b=2, v=4))


# ==================================================================================================
# real CLI: micro 1-shot fit, then evaluate the checkpoint (CI's checkpoint evaluation)
# ==================================================================================================


def _micro_config(weights: Path, root: Path) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_epochs": 1, "limit_val_batches": 1, "num_sanity_val_steps": 0,
            "deterministic": True, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root), "name": "logs", "version": ""}},
            "callbacks": [
                {"class_path": "robustft.callbacks.OODEvaluation",
                 "init_args": {"report_dir": str(root / "fit_report"), "plots": False}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
            ],
        },
        "model": {"class_path": "robustft.methods.local_prompt.LocalPrompt",
                  "init_args": {"clip_model": MICRO, "pretrained": str(weights), "n_ctx": 4, "n_neg_prompts": 16,
                                "num_pos": 2, "train_topk": 4, "eval_top_k": 10,
                                "optimizer": {"class_path": "torch.optim.SGD",
                                              "init_args": {"lr": 0.05, "momentum": 0.9}}}},
        "data": {"class_path": "robustft.data.OODDataModule",
                 "init_args": {"train": {"source": "npz", "path": "data/cifar10/cifar10_train_5k_jpeg.npz"},
                               "shots_per_class": 1, "shots_seed": 1, "n_views": 4,
                               "augmentation": "random_resized_crop_full",
                               "test": {"source": "npz", "path": "data/cifar10/cifar10_test_2k.npz", "max_samples": 300},
                               "ood": {"far": {"mnist": {"source": "mnist", "path": "data/mnist", "max_samples": 200},
                                               "dtd": {"source": "npz", "path": "data/dtd/dtd_10class_32.npz",
                                                       "max_samples": 200}}},
                               "val_fraction": 0.01, "batch_size": 5, "eval_batch_size": 300}},
    }


@pytest.mark.slow
def test_micro_fit_through_the_cli_then_evaluate_the_checkpoint(clip_micro_pretrained, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    path = tmp_path / "local_prompt.yaml"
    path.write_text(yaml.safe_dump(_micro_config(clip_micro_pretrained.weights, tmp_path)))
    cli = main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 2 * 2  # 10 one-shot images / batch 5 = 2 batches, num_pos 2 steps each
    assert {"train/local_pos", "train/local_neg", "train/neg_div", "train/loss"} <= set(cli.trainer.callback_metrics)
    ckpt = tmp_path / "logs" / "checkpoints" / "last.ckpt"
    loaded = LocalPrompt.load_from_checkpoint(ckpt)  # plain Python: class names and prompts from the checkpoint
    assert loaded.class_names == cli.model.class_names and loaded.num_classes == 10
    assert torch.equal(loaded.local_prompts.ctx, cli.model.local_prompts.ctx.cpu())
    assert torch.equal(loaded.neg_prompts.ctx, cli.model.neg_prompts.ctx.cpu())
    main(["evaluate", "--config", str(path), "--ckpt_path", str(ckpt), "--report_dir", str(tmp_path / "rep")])
    during_fit = json.loads((tmp_path / "fit_report" / "report.json").read_text())
    evaluated = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert compare_reports(during_fit, evaluated, atol=1e-6) == []
    assert evaluated["id"]["n"] == 300 and set(evaluated["ood"]) == {"mnist", "dtd"}
    assert set(evaluated["ood"]["mnist"]) == {"local_prompt", "regional_mcm", "mcm", "glmcm"}
    assert evaluated["meta"]["default_score"] == "local_prompt"
    # the pre-trained micro CLIP separates MNIST from CIFAR-10; Local-Prompt's score keeps it above chance
    assert evaluated["ood"]["mnist"]["local_prompt"]["auroc"] > 0.6
    assert_matches_expected_report(evaluated, EXPECTED_REPORT)


@pytest.mark.parametrize("config", ["cifar10_micro_4shot", "imagenet_vit_b16_4shot", "imagenet_vit_b16_16shot"])
def test_shipped_configs_instantiate(config: str, tmp_path: Path) -> None:
    path = REPO / "configs" / "local_prompt" / f"{config}.yaml"
    overrides = ["--model.init_args.pretrained", "null"]
    if "imagenet" in config:  # no ImageNet offline: keep the recipe, build the micro model to check the schema
        overrides += ["--model.init_args.clip_model", MICRO, "--model.init_args.n_ctx", "1",  # 16-token context
                      "--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)  # nothing may be written into the repository
        cli = main(["--config", str(path), *overrides], run=False)
    assert isinstance(cli.model, LocalPrompt) and cli.model.automatic_optimization is False
    if "imagenet" in config:
        assert cli.model.num_classes == 1000 and cli.model.hparams.train_topk == 50
        assert cli.datamodule.n_views == 16 and cli.datamodule.augmentation == "random_resized_crop_full"
