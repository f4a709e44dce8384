"""CLIPN: the spec's CPU-checkable properties (methods-ood-detection.md 1(g)) and the real CLI.

- at initialisation the no tower equals the yes tower: p^yes = p^no = 0.5, CTW = ATD = 0.5, L_tso = 1.99;
- only the no tower and the no-prompts get gradients; frozen values are unchanged by an optimizer step;
- the vectorised losses equal naive double loops over (image, caption) pairs;
- a few AdamW steps on a fixed batch lower the loss, raise p^yes on matched and p^no on unmatched pairs
  and push cos(yes, no) down;
- eval is deterministic (mean prompt), training draws among n_prompts + 1 options;
- the CTW / ATD scores and decisions match their definitions (brute force per sample);
- classification (and every yes-logit score) is identical to zero-shot CLIP on the pre-trained micro CLIP;
- a micro ``fit`` through the real CLI, then ``evaluate`` of its checkpoint, equal to the stored report.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from micro_cli import assert_matches_expected_report

from robustft.cli import main
from robustft.methods.clipn import CLIPN, clipn_losses
from robustft.methods.zero_shot import ZeroShotCLIP
from robustft.ood.clipn_scores import atd, atd_decision, ctw, ctw_decision
from robustft.ood.report import compare_reports

REPO = Path(__file__).resolve().parents[2]
EXPECTED_REPORT = REPO / "tests" / "expected" / "clipn_micro_report.json"
MICRO = "robustft-micro-vit"
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> object:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def micro_clipn(seed: int = 0, **kwargs) -> CLIPN:
    torch.manual_seed(seed)
    kwargs.setdefault("class_names", NAMES)
    kwargs.setdefault("templates", ["a photo of a {}."])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random init is fine for the structural tests
        model = CLIPN(MICRO, **kwargs)
    model.log = lambda *args, **kw: None  # no Trainer to log to
    return model


def _batch(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "label": torch.arange(n) % 10}


def _frozen_state(model: CLIPN) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.backbone.state_dict().items()}


# ==================================================================================================
# Losses and initial state
# ==================================================================================================


def test_at_initialisation_no_equals_yes_and_every_probability_is_one_half() -> None:
    model = micro_clipn(templates=["a photo of a {}.", "a blurry photo of a {}."])
    batch = _batch()
    for mode in (True, False):  # zero prompts: every one of the 17 options is the identity
        model.train(mode)
        yes_tokens, no_tokens = model.caption_pairs(batch)
        assert torch.equal(yes_tokens, no_tokens)  # learnable variant: the same caption in both towers
        with torch.no_grad():
            torch.testing.assert_close(model.encode_no(no_tokens), model.backbone.encode_text(yes_tokens), rtol=0, atol=1e-6)
    model.train()
    losses = model.training_losses(batch)
    assert set(losses) == {"itbo_yes", "itbo_no", "tso"}
    torch.testing.assert_close(losses["itbo_yes"], torch.tensor(0.5 * math.log(2)), rtol=0, atol=1e-6)
    torch.testing.assert_close(losses["itbo_no"], torch.tensor(0.5 * math.log(2)), rtol=0, atol=1e-6)
    torch.testing.assert_close(losses["tso"], torch.tensor(0.5 * 1.99), rtol=0, atol=1e-5)  # 2 - sqrt(1e-4)
    model.eval()
    out = model.forward_eval(batch)
    torch.testing.assert_close(out["no_logits"], out["logits"], rtol=0, atol=1e-4)
    scores = model.ood_scores(out)
    torch.testing.assert_close(scores["ctw"], torch.full((8,), 0.5), rtol=0, atol=1e-5)
    torch.testing.assert_close(scores["atd"], torch.full((8,), 0.5), rtol=0, atol=1e-5)


def test_vectorised_losses_equal_naive_double_loops() -> None:
    g = torch.Generator().manual_seed(3)
    n, e, s = 7, 12, 30.0
    image, yes, no = (torch.nn.functional.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1)
                      for _ in range(3))
    losses = clipn_losses(image, yes, no, s)

    def p(i: int, j: int, answer: str) -> float:  # the 2-way softmax of pair (i, j)
        a, b = math.exp(s * float(image[i] @ yes[j])), math.exp(s * float(image[i] @ no[j]))
        return (a if answer == "yes" else b) / (a + b)

    l_yes = -sum(math.log(p(i, i, "yes")) for i in range(n)) / n
    l_no = -sum(math.log(p(i, j, "no")) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    l_tso = sum(2 - math.sqrt(2 - 2 * float(yes[j] @ no[j]) + 1e-4) for j in range(n)) / n
    assert losses["itbo_yes"].item() == pytest.approx(0.5 * l_yes, rel=1e-10)
    assert losses["itbo_no"].item() == pytest.approx(0.5 * l_no, rel=1e-10)
    assert losses["tso"].item() == pytest.approx(0.5 * l_tso, rel=1e-10)
    # no_pairs: other_class leaves same-class pairs out of L_no (and only L_no)
    ids = torch.tensor([0, 1, 0, 2, 1, 3, 0])
    kept = [(i, j) for i in range(n) for j in range(n) if i != j and ids[i] != ids[j]]
    masked = clipn_losses(image, yes, no, s, match_ids=ids)
    assert masked["itbo_no"].item() == pytest.approx(-0.5 * sum(math.log(p(i, j, "no")) for i, j in kept) / len(kept), rel=1e-10)
    assert masked["itbo_yes"].item() == losses["itbo_yes"].item() and masked["tso"].item() == losses["tso"].item()
    assert clipn_losses(image, yes, no, s, match_ids=torch.zeros(n))["itbo_no"].item() == 0.0  # one class: no pair
    # TSO is minimised (0) at h = -g and maximal (1.99) at h = g
    assert clipn_losses(image, yes, -yes, s)["tso"].item() == pytest.approx(0.5 * (2 - math.sqrt(4 + 1e-4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        clipn_losses(image[:1], yes[:1], no[:1], s)


# ==================================================================================================
# What trains
# ==================================================================================================


def test_only_the_no_tower_and_the_prompts_get_gradients_and_frozen_values_stay() -> None:
    model = micro_clipn().train()
    frozen = _frozen_state(model)
    assert all(not p.requires_grad for p in model.backbone.parameters())
    CLIPN.total_loss(model.training_losses(_batch())).backward()
    for name, p in model.backbone.named_parameters():
        assert p.grad is None, name  # image tower, yes tower, logit_scale
    for name in ("prompt_no", "no_tower.token_embedding.weight", "no_tower.positional_embedding",
                 "no_tower.transformer.resblocks.0.attn.in_proj_weight", "no_tower.ln_final.weight",
                 "no_tower.text_projection"):
        p = model.get_parameter(name)
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    groups = model.optimizer_param_groups()
    assert {g["name"]: g.get("wd_mult", 1.0) for g in groups} == {"no_tower": 1.0, "no_tower_gain_bias": 0.0}
    assert any(p is model.prompt_no for p in groups[0]["params"])  # the prompts are decayed (official)
    assert sum(len(g["params"]) for g in groups) == len(model.trainable_parameters())
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.2)
    before_no = model.no_tower.text_projection.detach().clone()
    optimizer.step()
    after = model.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert not torch.equal(model.no_tower.text_projection, before_no)
    # the no tower is an independent copy: it shares no storage with the yes tower
    yes_ptrs = {p.data_ptr() for p in model.backbone.parameters()}
    assert not yes_ptrs & {p.data_ptr() for p in model.no_tower.parameters()}


def test_a_few_steps_on_a_fixed_batch_teach_the_no_tower_to_say_no() -> None:
    model = micro_clipn().train()
    batch = _batch(8)  # 8 distinct classes: 8 distinct captions

    def stats() -> tuple[float, float, float, float]:
        model.eval()  # the mean prompt: a deterministic read-out
        with torch.no_grad():
            image, yes, no = model.training_features(batch)
            loss = CLIPN.total_loss(clipn_losses(image, yes, no, model.backbone.logit_scale)).item()
            s = model.backbone.logit_scale
            p_yes = torch.sigmoid(s * image @ yes.T - s * image @ no.T)
            off = ~torch.eye(8, dtype=torch.bool)
        model.train()
        return loss, p_yes.diagonal().mean().item(), (1 - p_yes)[off].mean().item(), (yes * no).sum(-1).mean().item()

    loss0, match0, unmatched0, cos0 = stats()
    assert cos0 == pytest.approx(1.0, abs=1e-5)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    for _ in range(50):  # measured: loss 1.69 -> 0.67, p_yes 0.50 -> 0.57, p_no 0.50 -> 0.59, cos 1 -> -0.63
        optimizer.zero_grad()
        CLIPN.total_loss(model.training_losses(batch)).backward()
        optimizer.step()
    loss1, match1, unmatched1, cos1 = stats()
    print(f"\nloss {loss0:.3f}->{loss1:.3f}, p_yes(ii) {match0:.3f}->{match1:.3f}, "
          f"p_no(ij) {unmatched0:.3f}->{unmatched1:.3f}, cos(g,h) {cos0:.3f}->{cos1:.3f}")
    assert loss1 < loss0 - 0.5
    assert match1 > match0 + 0.03 and unmatched1 > unmatched0 + 0.03
    assert cos1 < cos0 - 1.0


def test_eval_uses_the_mean_prompt_and_training_draws_per_sample() -> None:
    model = micro_clipn()
    with torch.no_grad():
        model.prompt_no.normal_(std=0.5)
    tokens = model.backbone.tokenize(["a photo of a cat."] * 64)
    model.eval()
    first, second = model.encode_no(tokens[:4]), model.encode_no(tokens[:4])
    assert torch.equal(first, second)
    batch = _batch(4)
    assert torch.equal(model.forward_eval(batch)["no_logits"], model.forward_eval(batch)["no_logits"])
    model._no_cache = None  # recomputed: the same class no-embeddings
    assert torch.equal(model.forward_eval(batch)["no_logits"], model.forward_eval(batch)["no_logits"])
    # the eval prompt is the mean of the prompts
    embeddings, eot = model.no_tower.embed_tokens(tokens[:1])
    mean_prompt = model.prompt_no.mean(0, keepdim=True)
    expected = model.no_tower.encode_embeddings(embeddings + mean_prompt, eot, normalize=True)
    torch.testing.assert_close(first[:1], expected, rtol=0, atol=1e-6)
    # training: one of 17 options per sample, uniformly (all 17 show up in 64 x 10 draws)
    model.train()
    torch.manual_seed(0)
    drawn = torch.cat([model.prompt_choices(64) for _ in range(10)])
    assert set(drawn.tolist()) == set(range(17))
    same_caption = model.encode_no(tokens)
    distinct = {tuple(r.tolist()) for r in same_caption.detach().round(decimals=5)}
    assert 2 <= len(distinct) <= 17  # one caption, at most n_prompts + 1 different embeddings


# ==================================================================================================
# Scores and decisions
# ==================================================================================================


def test_ctw_atd_scores_and_decisions_match_their_definitions() -> None:
    g = torch.Generator().manual_seed(5)
    logits = 10 * torch.randn(200, 6, generator=g, dtype=torch.float64)
    no_logits = 10 * torch.randn(200, 6, generator=g, dtype=torch.float64)
    s_ctw, s_atd = ctw(logits, no_logits), atd(logits, no_logits)
    d_ctw, d_atd = ctw_decision(logits, no_logits), atd_decision(logits, no_logits)
    for i in range(200):
        lse = math.log(sum(math.exp(float(v)) for v in logits[i]))
        p = [math.exp(float(v) - lse) for v in logits[i]]
        q = [math.exp(float(a)) / (math.exp(float(a)) + math.exp(float(b))) for a, b in zip(logits[i], no_logits[i], strict=True)]
        y = max(range(6), key=lambda k: p[k])
        assert s_ctw[i].item() == pytest.approx(q[y], rel=1e-9)
        assert bool(d_ctw[i]) == (q[y] < 0.5)
        score = sum(pk * qk for pk, qk in zip(p, q, strict=True))
        assert s_atd[i].item() == pytest.approx(score, rel=1e-9)
        assert bool(d_atd[i]) == (1 - score > max(pk * qk for pk, qk in zip(p, q, strict=True)))
    assert 0 < int(d_ctw.sum()) < 200 and 0 < int(d_atd.sum()) < 200  # both outcomes are exercised
    assert bool(((s_atd >= 0) & (s_atd <= 1)).all())
    never_no = torch.full_like(no_logits, -math.inf)  # the no tower never fires
    torch.testing.assert_close(atd(logits, never_no), torch.ones(200, dtype=torch.float64), rtol=0, atol=1e-12)  # softmax sums to 1
    assert torch.equal(ctw(logits, never_no), torch.ones(200, dtype=torch.float64))
    assert not atd_decision(logits, never_no).any() and not ctw_decision(logits, never_no).any()


def test_predict_step_records_both_rules_decisions() -> None:
    model = micro_clipn().eval()
    with torch.no_grad():
        model.prompt_no.normal_(std=0.5)
    batch = {**_batch(6), "index": torch.arange(6)}
    out = model.predict_step(batch, 0)
    fe = model.forward_eval(batch)
    assert torch.equal(out["ctw_ood"], fe["logits"].gather(1, fe["logits"].argmax(1, keepdim=True)).squeeze(1)
                       .sub(fe["no_logits"].gather(1, fe["logits"].argmax(1, keepdim=True)).squeeze(1)) < 0)
    assert torch.equal(out["atd_ood"], atd_decision(fe["logits"], fe["no_logits"]))
    assert {"atd", "ctw", "mcm", "msp", "maxlogit", "energy", "prediction", "index"} <= set(out)


# ==================================================================================================
# Variants and bad input
# ==================================================================================================


def test_handcrafted_variant_pairs_yes_and_no_templates() -> None:
    model = micro_clipn(variant="handcrafted", templates=["a photo of a {}.", "a bad photo of the {}."])
    assert model.prompt_no is None
    assert model.no_templates == ["a photo of no {}.", "a bad photo of no {}."]
    torch.manual_seed(1)
    yes, no = model.caption_pairs({"label": torch.tensor([3, 3, 3, 3, 3, 3, 3, 3])})
    pairs = [("a photo of a cat.", "a photo of no cat."), ("a bad photo of the cat.", "a bad photo of no cat.")]
    tokenized = {tuple(model.backbone.tokenize(list(pair)).flatten().tolist()) for pair in pairs}
    drawn = {tuple(torch.cat([y, n]).tolist()) for y, n in zip(yes, no, strict=True)}
    assert drawn == tokenized  # both pairs drawn, a yes template never paired with the other no template
    # captions from the source (webdataset .txt) are wrapped in the pair
    yes, no = model.caption_pairs({"text": ["dog on a beach"] * 4})
    allowed = model.backbone.tokenize(["a photo of no dog on a beach.", "a bad photo of no dog on a beach."])
    assert {tuple(n.tolist()) for n in no} <= {tuple(t.tolist()) for t in allowed}
    # eval: class no-embeddings come from the no-templates through the no tower
    with torch.no_grad():
        expected = model.no_tower.encode_tokens(model.backbone.tokenize([t.format("cat") for t in model.no_templates]), normalize=True)
    torch.testing.assert_close(model.class_no_features()[3], torch.nn.functional.normalize(expected.mean(0), dim=0), rtol=0, atol=1e-6)


def test_bad_configuration_names_the_field() -> None:
    with pytest.raises(ValueError, match="model.variant"):
        micro_clipn(variant="learned")
    with pytest.raises(ValueError, match="model.n_prompts"):
        micro_clipn(n_prompts=0)
    with pytest.raises(ValueError, match="model.no_templates lists 1 .* model.templates 2"):
        micro_clipn(variant="handcrafted", templates=["a photo of a {}.", "art of a {}."], no_templates=["a photo of no {}."])
    with pytest.raises(ValueError, match="model.no_templates: cannot derive"):
        micro_clipn(variant="handcrafted", templates=["itap of a{}"])
    with pytest.raises(ValueError, match="only used by variant: handcrafted"):
        micro_clipn(no_templates=["a photo of no {}."])
    with pytest.raises(ValueError, match="model.no_pairs must be"):
        micro_clipn(no_pairs="others")
    with pytest.raises(ValueError, match="no_pairs: other_class compares class labels"):
        micro_clipn(no_pairs="other_class").training_losses({"image": torch.zeros(2, 3, 32, 32), "text": ["a", "b"]})
    with pytest.raises(ValueError, match="model.eval_scale"):
        micro_clipn(eval_scale=0.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        micro_clipn().training_losses({"image": torch.zeros(2, 3, 32, 32), "label": torch.tensor([0, 12])})


# ==================================================================================================
# The pre-trained micro CLIP: zero-shot classification unchanged; the real CLI
# ==================================================================================================


def _micro_config(tmp_path: Path, weights: Path) -> dict:
    data = {"train": {"source": "npz", "path": "data/cifar10/cifar10_train_5k_jpeg.npz"},
            "test": {"source": "npz", "path": "data/cifar10/cifar10_test_2k.npz", "max_samples": 300},
            "ood": {"near": {"tin": {"source": "npz", "path": "data/tinyimagenet/tin_test_32.npz", "max_samples": 150}},
                    "far": {"mnist": {"source": "mnist", "path": "data/mnist", "max_samples": 150},
                            "dtd": {"source": "npz", "path": "data/dtd/dtd_10class_32.npz", "max_samples": 150}}},
            "val_fraction": 0.02, "batch_size": 32, "eval_batch_size": 150, "augmentation": "none"}
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 6, "limit_val_batches": 1,
                    "num_sanity_val_steps": 0, "deterministic": True, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path),
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path), "name": "tb", "version": ""}},
                    "callbacks": [
                        {"class_path": "robustft.callbacks.OODEvaluation",
                         "init_args": {"report_dir": str(tmp_path / "fit_report"), "plots": False}},
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}]},
        "model": {"class_path": "robustft.methods.clipn.CLIPN",
                  "init_args": {"clip_model": MICRO, "pretrained": str(weights), "templates": ["a photo of a {}."],
                                "n_prompts": 4,
                                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1.0e-3, "weight_decay": 0.2}}}},
        "data": {"class_path": "robustft.data.OODDataModule", "init_args": data},
    }


@pytest.mark.slow
def test_micro_fit_through_the_cli_then_evaluate_the_checkpoint(
    clip_micro_pretrained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    config = _micro_config(tmp_path, clip_micro_pretrained.weights)
    path = tmp_path / "clipn.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 6
    assert {"train/itbo_yes", "train/itbo_no", "train/tso", "train/loss"} <= set(cli.trainer.callback_metrics)
    assert cli.trainer.callback_metrics["train/cos_yes_no"] < 0.99  # the no tower moved away from the yes tower
    ckpt = tmp_path / "tb" / "checkpoints" / "last.ckpt"
    main(["evaluate", "--config", str(path), "--ckpt_path", str(ckpt), "--report_dir", str(tmp_path / "rep")])
    during_fit = json.loads((tmp_path / "fit_report" / "report.json").read_text())
    evaluated = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert compare_reports(during_fit, evaluated, atol=1e-6) == []
    assert evaluated["meta"]["default_score"] == "atd"
    assert set(evaluated["ood"]) == {"tin", "mnist", "dtd"}
    assert set(evaluated["ood"]["mnist"]) == {"atd", "ctw", "mcm", "msp", "maxlogit", "energy"}
    # the threshold-free decisions of both rules, summarised per set in the report's meta
    summaries = evaluated["meta"]["set_summaries"]
    assert set(summaries) == {"id", "tin", "mnist", "dtd"}
    for summary in summaries.values():
        assert set(summary) == {"ctw_ood_fraction", "atd_ood_fraction"}
        assert all(0.0 <= v <= 1.0 for v in summary.values())
    n_id = evaluated["id"]["n"]
    assert all(round(v * n_id, 6).is_integer() for v in summaries["id"].values())  # a fraction of the ID samples

    # zero-shot CLIP on the same weights and data: classification and every yes-logit score are identical
    zs = json.loads(json.dumps(config))
    zs["model"] = {"class_path": "robustft.methods.ZeroShotCLIP",
                   "init_args": {"clip_model": MICRO, "pretrained": str(clip_micro_pretrained.weights),
                                 "templates": ["a photo of a {}."], "scores": ["mcm", "msp", "maxlogit", "energy"]}}
    zs["trainer"]["callbacks"] = []
    zs_path = tmp_path / "zero_shot.yaml"
    zs_path.write_text(yaml.safe_dump(zs))
    main(["evaluate", "--config", str(zs_path), "--report_dir", str(tmp_path / "zs")])
    zero_shot = json.loads((tmp_path / "zs" / "report.json").read_text())
    assert evaluated["id"] == zero_shot["id"]
    for name in ("tin", "mnist", "dtd"):
        for score in ("mcm", "msp", "maxlogit", "energy"):
            for metric, value in zero_shot["ood"][name][score].items():
                assert evaluated["ood"][name][score][metric] == pytest.approx(value, abs=1e-6), (name, score, metric)
    aurocs = {n: round(evaluated["ood"][n]["atd"]["auroc"], 4) for n in ("tin", "mnist", "dtd")}
    print(f"\nmicro CLIPN ATD AUROC {aurocs}; zero-shot acc {zero_shot['id']['acc']:.4f}")
    assert aurocs["mnist"] > 0.55  # a real ID/OOD split, above chance (0.5) after 6 steps; measured 0.61
    # CI's checkpoint evaluation: the same micro run must reproduce the stored report
    assert_matches_expected_report(evaluated, EXPECTED_REPORT)


def test_shipped_clipn_configs_instantiate(tmp_path: Path) -> None:
    for path in sorted((REPO / "configs" / "clipn").glob("*.yaml")):
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(tmp_path)  # nothing may be written into the repository
            overrides = ["--model.init_args.pretrained", "null", "--model.init_args.clip_model", MICRO,
                         "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
                         "--trainer.precision", "32-true"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cli = main(["--config", str(path), *overrides], run=False)
        assert isinstance(cli.model, CLIPN), path.name
        assert cli.model.default_score == "atd"
        assert isinstance(cli.model, ZeroShotCLIP)
        if path.name == "cc3m_vit_b16.yaml":  # the paper's: 1000 ImageNet names, 80 templates as "{}" strings
            assert len(cli.model.class_names) == 1000 and len(cli.model.templates) == 80
            assert cli.model.templates[0].count("{}") == 1 and cli.model.prompt_no.shape[0] == 16


def test_set_summary_is_the_fraction_each_rule_calls_ood() -> None:
    """``summarize_outputs`` (report meta) agrees with the per-sample decisions of both rules."""
    g = torch.Generator().manual_seed(0)
    outputs = {"logits": 5 * torch.randn(40, 10, generator=g), "no_logits": 5 * torch.randn(40, 10, generator=g)}
    summary = CLIPN.summarize_outputs(None, outputs)  # type: ignore[arg-type] - uses no model state
    ctw_ood = ctw_decision(outputs["logits"], outputs["no_logits"])
    atd_ood = atd_decision(outputs["logits"], outputs["no_logits"])
    assert summary == {"ctw_ood_fraction": ctw_ood.float().mean().item(), "atd_ood_fraction": atd_ood.float().mean().item()}
    assert 0 < summary["atd_ood_fraction"] < 1  # both outcomes occur on this input, so the check has teeth
