"""LOOK: the spec's CPU-checkable properties (section 4(g)) and the real CLI.

- the vectorised loss equals a brute-force per-query loop (every orphan policy, both loss forms);
- leave-one-out: the query's own key (same id) never changes the loss, the same key under another id does;
- k = |memory| is NCA; tau -> inf gives the fraction of same-label neighbours; all-same neighbours give ~0;
- a bimodal class has ~zero LOOK loss where the SupCon-style loss is large;
- gradients reach only the query encoder; m = 0 copies it into the key encoder, m = 1 freezes the copy;
- the queue wraps around with keys, labels and ids aligned; evaluation is the soft kNN over the queue;
- resuming from a checkpoint continues exactly (queue, key encoder, weights);
- a micro LOOK ``fit`` -> exported backbone -> linear probe ``fit`` -> ``evaluate``, vs the stored report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from micro_cli import assert_matches_expected_report

from robustft.data import OODDataModule
from robustft.methods.look import LOOK, ExportBackbone
from robustft.methods.look.loss import knn_loss

REPO = Path(__file__).resolve().parents[2]
EXPECTED_REPORT = REPO / "tests" / "expected" / "look_micro_report.json"
CIFAR_TEST = str(REPO / "data/cifar10/cifar10_test_2k.npz")


# ---------------------------------------------------------------------------------------------------- loss
def _random_problem(seed: int = 0, b: int = 6, n: int = 40, d: int = 8, classes: int = 3) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    keys = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    ids = torch.arange(b) * 3  # some memory entries carry the queries' ids (their own keys, other views)
    key_ids = torch.randint(0, 3 * b, (n,), generator=g)
    key_ids[:b] = ids
    keys[:b] = F.normalize(q + 0.05 * torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)  # very close
    valid = torch.ones(n, dtype=torch.bool)
    valid[-5:] = False  # unfilled queue slots
    return {"queries": q, "labels": torch.randint(0, classes, (b,), generator=g), "ids": ids, "keys": keys,
            "key_labels": torch.randint(0, classes, (n,), generator=g), "key_ids": key_ids, "key_valid": valid}


def _brute_force(p: dict[str, Any], k: int | None, tau: float, orphans: str, form: str, loo: bool,
                 delta: float = 1e-12) -> tuple[float, list[bool]]:
    """One query at a time: drop own ids and invalid slots, sort, take the top k, soft vote."""
    losses, included = [], []
    for i in range(len(p["queries"])):
        sim = {j: float(p["queries"][i] @ p["keys"][j]) for j in range(len(p["keys"]))
               if bool(p["key_valid"][j]) and not (loo and int(p["key_ids"][j]) == int(p["ids"][i]))}
        ranked = sorted(sim, key=lambda j: -sim[j])
        top = ranked if k is None else ranked[:k]
        y = int(p["labels"][i])
        pos = [j for j in top if int(p["key_labels"][j]) == y]
        if orphans == "positive" and not pos:
            same = [j for j in ranked if int(p["key_labels"][j]) == y]
            if same:
                top, pos = top + same[:1], same[:1]
        z = sum(math.exp(sim[j] / tau) for j in top)
        if form == "look":
            keep = {"guard": bool(top), "drop": bool(pos), "positive": bool(pos)}[orphans]
            value = -math.log(sum(math.exp(sim[j] / tau) for j in pos) / z + delta) if top else 0.0
        else:
            keep = bool(pos)
            value = -sum(sim[j] / tau - math.log(z) for j in pos) / len(pos) if pos else 0.0
        included.append(keep)
        if keep:
            losses.append(value)
    return sum(losses) / max(1, len(losses)), included


def _loss(p: dict[str, Any], **kwargs: Any):
    return knn_loss(p["queries"], p["labels"], p["ids"], p["keys"], p["key_labels"], p["key_ids"],
                    key_valid=p["key_valid"], **kwargs)


@pytest.mark.parametrize("orphans", ["guard", "drop", "positive"])
@pytest.mark.parametrize(("form", "k", "loo"), [("look", 5, True), ("look", 1, True), ("look", None, True),
                                                ("supcon", 5, True), ("supcon", None, False)])
def test_vectorised_loss_equals_brute_force_loop(orphans: str, form: str, k: int | None, loo: bool) -> None:
    for seed in range(3):
        p = _random_problem(seed)
        out = _loss(p, k=k, temperature=0.2, orphans=orphans, form=form, leave_one_out=loo)
        want, included = _brute_force(p, k, 0.2, orphans, form, loo)
        assert out.included.tolist() == included
        assert abs(float(out.loss) - want) < 1e-6, (seed, float(out.loss), want)
    if k == 1 and form == "look":  # k = 1 with 3 classes makes orphans: the policies must differ
        assert bool(out.orphan.any())


def test_leave_one_out_own_key_never_counts_but_the_same_key_under_another_id_does() -> None:
    p = _random_problem(1)
    base = _loss(p, k=5, temperature=0.1)
    for i in range(6):  # insert query i's own embedding (distance 0, its label) into the memory
        def with_key(key_id: int, i: int = i) -> dict[str, Any]:
            return {**p, "keys": torch.cat([p["keys"], p["queries"][i : i + 1]]),
                    "key_labels": torch.cat([p["key_labels"], p["labels"][i : i + 1]]),
                    "key_ids": torch.cat([p["key_ids"], torch.tensor([key_id])]),
                    "key_valid": torch.cat([p["key_valid"], torch.ones(1, dtype=torch.bool)])}

        own = _loss(with_key(int(p["ids"][i])), k=5, temperature=0.1)
        assert torch.equal(own.per_sample[i], base.per_sample[i])  # exactly unchanged
        other = _loss(with_key(1000), k=5, temperature=0.1)
        # the key is the query itself (similarity 1, the top neighbour, same label): its loss drops
        assert float(other.per_sample[i]) < float(base.per_sample[i]) - 1e-3
        # without leave-one-out the own id counts like a foreign one
        no_loo = _loss(with_key(int(p["ids"][i])), k=5, temperature=0.1, leave_one_out=False)
        assert float(no_loo.per_sample[i]) < float(base.per_sample[i]) - 1e-3


def test_k_all_is_nca_and_the_temperature_and_purity_limits() -> None:
    p = _random_problem(2)
    n_valid = int(p["key_valid"].sum())
    nca = []
    for i in range(6):  # NCA: -log sum_{same} exp(s/tau) / sum_all exp(s/tau), own ids excluded
        keep = p["key_valid"] & (p["key_ids"] != p["ids"][i])
        s = (p["keys"][keep] @ p["queries"][i]) / 0.5
        same = p["key_labels"][keep] == p["labels"][i]
        nca.append(-(torch.logsumexp(s[same], 0) - torch.logsumexp(s, 0)))
    want = torch.stack(nca).mean()
    for k in (None, n_valid, 10**6):
        torch.testing.assert_close(_loss(p, k=k, temperature=0.5).loss, want, rtol=0, atol=1e-10)
    # tau -> inf: P(y|x) -> the fraction of same-label keys among the k nearest
    out = _loss(p, k=7, temperature=1e8)
    _, included = _brute_force(p, 7, 1.0, "guard", "look", True)
    for i in range(6):
        keep = p["key_valid"] & (p["key_ids"] != p["ids"][i])
        s = p["keys"] @ p["queries"][i]
        top = s.masked_fill(~keep, -2).topk(7).indices
        frac = (p["key_labels"][top] == p["labels"][i]).double().mean()
        if frac > 0:
            assert abs(math.exp(-float(out.per_sample[i])) - float(frac)) < 1e-6
    # every neighbour of the query's label: loss ~ 0
    pure = {**p, "key_labels": p["labels"][0].repeat(len(p["keys"])), "labels": p["labels"][0].repeat(6)}
    assert float(_loss(pure, k=5, temperature=0.1).loss) < 1e-9


def test_bimodal_class_near_zero_look_loss_where_supcon_is_large() -> None:
    """Class A = two far-apart clusters, class B = two others: LOOK with a small k only needs
    same-label neighbours (all in the query's own cluster), SupCon wants every positive close."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)  # A, A, B, B
    points = torch.cat([c + 0.05 * torch.randn(10, 2, generator=g, dtype=torch.float64) for c in centres])
    points = F.normalize(points, dim=1)
    labels = torch.tensor([0] * 20 + [1] * 20)
    ids = torch.arange(40)
    args = (points, labels, ids, points, labels, ids)
    look = knn_loss(*args, k=5, temperature=0.1)
    supcon = knn_loss(*args, k=None, temperature=0.1, form="supcon")
    assert float(look.loss) < 1e-6 and not bool(look.orphan.any())
    assert float(supcon.loss) > 5.0  # half of each anchor's positives sit at cosine -1
    merged = torch.cat([points[:10], points[:10], points[20:30], points[20:30]])  # each class on one mode
    assert float(knn_loss(merged, labels, ids, merged, labels, ids, k=None, temperature=0.1, form="supcon").loss) < 0.3 * float(supcon.loss)


def test_orphan_policies() -> None:
    """Query of class 0 whose 2 nearest keys are class 1 and whose only class-0 key is far."""
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    keys = F.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.2]], dtype=torch.float64), dim=1)
    args = (q.requires_grad_(), torch.tensor([0]), torch.tensor([9]), keys, torch.tensor([1, 1, 0]), torch.arange(3))
    guard = knn_loss(*args, k=2, temperature=0.1, orphans="guard")
    assert bool(guard.orphan.all()) and abs(float(guard.loss) + math.log(1e-12)) < 1e-9
    guard.loss.backward()
    assert float(q.grad.abs().max()) == 0.0  # a constant: no gradient from an orphan
    drop = knn_loss(*args, k=2, temperature=0.1, orphans="drop")
    assert not bool(drop.included.any()) and float(drop.loss) == 0.0
    positive = knn_loss(*args, k=2, temperature=0.1, orphans="positive")
    s = keys @ q.detach()[0] / 0.1
    assert abs(float(positive.loss) + math.log(math.exp(float(s[2] - torch.logsumexp(s, 0))) + 1e-12)) < 1e-9
    assert positive.probs.argmax(1).item() == 1  # the kNN vote is the plain top-k, without the added positive


# ---------------------------------------------------------------------------------------------------- module
def _model(**kwargs: Any) -> LOOK:
    torch.manual_seed(0)
    defaults: dict[str, Any] = {"num_classes": 3, "k": 4, "queue_size": 10, "proj_dim": 16, "momentum": 0.9}
    return LOOK(**{**defaults, **kwargs})


def _batch(step: int, b: int = 4, views: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.arange(b) + step * b
    return {"image": torch.randn(b, views, 3, 32, 32, generator=g), "label": ids % 3, "index": ids}


def test_gradients_reach_only_the_query_encoder_and_momentum_limits() -> None:
    model = _model().train()
    losses = model.training_losses(_batch(0))
    assert set(losses) == {"look"}
    losses["look"].backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0}
    assert any(n.startswith("backbone.") for n in trained) and any(n.startswith("projector.") for n in trained)
    assert all(p.grad is None and not p.requires_grad for p in model.key_encoder.parameters())
    assert not model.queue.keys.requires_grad
    names = {g["name"] for g in model.optimizer_param_groups()}
    assert names == {"backbone", "projector"}
    with torch.no_grad():  # a pretend optimizer step
        for p in model.parameters():
            p.add_(0.01)
    frozen = [p.clone() for p in model.key_encoder.parameters()]
    model.key_encoder.update(model.query_encoder(), momentum=1.0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.key_encoder.parameters(), strict=True))
    model.key_encoder.update(model.query_encoder(), momentum=0.0)
    query = dict(model.query_encoder().named_parameters())
    assert all(torch.equal(p, query[n]) for n, p in model.key_encoder.module.named_parameters())


def test_queue_wraps_around_with_keys_labels_and_ids_aligned() -> None:
    model = _model().train()
    seen: list[torch.Tensor] = []
    encode = model.encode_keys
    model.encode_keys = lambda images: seen.append(encode(images)) or seen[-1]  # type: ignore[method-assign]
    for step in range(4):  # 16 keys into 10 slots: the third batch crosses the end
        model.training_losses(_batch(step))
    all_keys, all_ids = torch.cat(seen), torch.arange(16)
    q = model.queue
    assert int(q.ptr) == 6 and len(q) == 10
    chrono = q.entries(chronological=True)
    assert chrono.ids.tolist() == list(range(6, 16))  # the 10 newest, oldest first
    assert torch.equal(chrono.labels, chrono.ids % 3)
    assert torch.equal(chrono.keys, all_keys[6:16])
    assert torch.equal(q.ids[:6], all_ids[10:16]) and torch.equal(q.keys[:6], all_keys[10:16])  # wrapped slots


def test_candidates_are_batch_keys_plus_queue_and_eval_is_knn_over_the_queue() -> None:
    model = _model().train()
    model.training_losses(_batch(0))
    queue_before = model.queue.entries()
    batch = _batch(1)
    captured: dict[str, torch.Tensor] = {}
    encode = model.encode_keys
    model.encode_keys = lambda images: captured.setdefault("keys", encode(images))  # type: ignore[method-assign]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = model.training_losses(batch)["look"]
    model.load_state_dict(state)  # replay: the query embedding of the step, the key encoder as it was then
    model.key_encoder.update(model.query_encoder())
    queries = model.query_encoder()(batch["image"][:, 0])
    ref = knn_loss(queries, batch["label"], batch["index"], torch.cat([captured["keys"], queue_before.keys]),
                   torch.cat([batch["label"], queue_before.labels]), torch.cat([batch["index"], queue_before.ids]),
                   k=4, temperature=0.1)
    torch.testing.assert_close(got, ref.loss, rtol=0, atol=1e-6)
    model.eval()
    images = torch.randn(5, 3, 32, 32)
    out = model.forward_eval({"image": images})
    emb = F.normalize(model.projector(model.backbone(images)), dim=1)
    entries = model.queue.entries()
    for i in range(5):  # brute-force soft kNN over the queue, no leave-one-out at evaluation
        s = entries.keys @ emb[i]
        top = s.topk(4).indices
        w = (s[top] / 0.1).softmax(0)
        probs = torch.zeros(3).index_add_(0, entries.labels[top], w)
        torch.testing.assert_close(out["logits"][i].exp(), probs + 1e-12, rtol=0, atol=1e-6)
    assert set(out) == model.output_keys() == {"logits", "features", "embedding"}


def test_bad_arguments_name_the_field() -> None:
    for kwargs, field in [({"k": 0}, "model.k"), ({"temperature": 0.0}, "model.temperature"),
                          ({"queue_size": 0}, "model.queue_size"), ({"momentum": 1.5}, "model.momentum"),
                          ({"orphans": "ignore"}, "model.orphans"), ({"loss_form": "ce"}, "model.loss_form")]:
        with pytest.raises(ValueError, match=field):
            LOOK(**kwargs)
    with pytest.raises(ValueError, match="model.num_classes"):
        _model().training_losses({**_batch(0), "label": torch.tensor([0, 1, 2, 3])})


def _data(n: int = 48, batch: int = 8) -> OODDataModule:
    return OODDataModule(train={"source": "npz", "path": CIFAR_TEST, "max_samples": n},
                         test={"source": "npz", "path": CIFAR_TEST, "max_samples": 16},
                         label_map=[1, 1, 0, 0, 0, 0, 0, 0, 1, 1], n_views=2, batch_size=batch, val_fraction=0.0)


def _trainer(tmp: Path, steps: int, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=True,
                      default_root_dir=tmp, **kwargs)


def test_loss_goes_down_and_resume_restores_queue_and_key_encoder_exactly(tmp_path: Path) -> None:
    """12 steps straight (a checkpoint written after step 6) vs 6 more steps resumed from that checkpoint:
    identical final state, the queue (keys, labels, ids, pointer) and the key encoder included. The loss
    over the second pass of the same 48 real images is lower than over the first."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def make() -> LOOK:
        pl.seed_everything(0)
        return LOOK(num_classes=2, k=8, queue_size=20, proj_dim=16, momentum=0.9,
                    backbone_weights=str(REPO / "data/weights/resnet20-12fca82f.th"),
                    optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.02, "momentum": 0.9}})

    straight = make()
    losses: list[float] = []
    record = straight.checked_total_loss
    straight.checked_total_loss = lambda ls, n=None: losses.append(float(ls["look"])) or record(ls, n)  # type: ignore[method-assign]
    every6 = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=6, save_top_k=-1)
    _trainer(tmp_path / "a", 12, callbacks=[every6]).fit(straight, datamodule=_data())
    assert len(losses) == 12 and sum(losses[6:]) < sum(losses[:6])

    resumed = make()
    _trainer(tmp_path / "b", 12).fit(resumed, datamodule=_data(), ckpt_path=str(tmp_path / "ckpt" / "step=6.ckpt"))
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and "queue.ids" in a and "key_encoder.num_updates" in a
    assert int(b["key_encoder.num_updates"]) == 12 and int(b["queue.num_filled"]) == 20
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------------- CLI
def _cli_config(tmp: Path, model: dict[str, Any], callbacks: list[dict], data: dict[str, Any], name: str) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 1,
                    "num_sanity_val_steps": 0, "deterministic": True, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp / name),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp / name), "name": "logs", "version": ""}},
                    "callbacks": [*callbacks, {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                               "init_args": {"save_last": True}}]},
        "model": model,
        "data": {"class_path": "robustft.data.OODDataModule",
                 "init_args": {"train": {"source": "npz", "path": "data/cifar10/cifar10_train_5k_jpeg.npz"},
                               "shots_per_class": 10, "shots_seed": 0,
                               "test": {"source": "npz", "path": "data/cifar10/cifar10_test_2k.npz", "max_samples": 200},
                               "ood": {"far": {"dtd": {"source": "npz", "path": "data/dtd/dtd_10class_32.npz",
                                                       "max_samples": 100}}},
                               "batch_size": 32, "eval_batch_size": 200, **data}},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_micro_look_fit_export_probe_then_evaluate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LOOK on coarse labels (vehicles vs animals) from the real ResNet-20, its backbone exported, a linear
    probe of the 10 fine classes on it, and ``evaluate`` of the probe's checkpoint: equal to the report
    written during the probe's fit and to the stored one."""
    from robustft.cli import main
    from robustft.ood.report import compare_reports

    monkeypatch.chdir(REPO)
    look = {"class_path": "robustft.methods.look.LOOK",
            "init_args": {"num_classes": 2, "backbone_weights": "data/weights/resnet20-12fca82f.th", "k": 10,
                          "queue_size": 64, "proj_dim": 32, "orphans": "positive",
                          "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.9}}}}
    pretrain = _cli_config(tmp_path, look, [{"class_path": "robustft.methods.look.ExportBackbone"}],
                           {"label_map": {"animals": ["bird", "cat", "deer", "dog", "frog", "horse"],
                                          "vehicles": ["airplane", "automobile", "ship", "truck"]},
                            "n_views": 2, "shots_per_class": 32}, "look")
    cli = main(["fit", "--config", str(pretrain)])
    assert cli.trainer.global_step == 4 and len(cli.model.queue) == 64
    assert {"train/look", "train/orphan_frac_epoch", "train/knn_acc", "val/acc"} <= set(cli.trainer.callback_metrics)
    # LOOK's own checkpoint evaluates through the shared engine: kNN over the restored queue (coarse classes)
    look_ckpt = tmp_path / "look" / "logs" / "checkpoints" / "last.ckpt"
    main(["evaluate", "--config", str(pretrain), "--ckpt_path", str(look_ckpt), "--report_dir", str(tmp_path / "look_rep")])
    look_report = json.loads((tmp_path / "look_rep" / "report.json").read_text())
    assert look_report["id"]["n"] == 200 and look_report["id"]["acc"] > 0.7  # vehicles vs animals, 64-key queue
    assert set(look_report["ood"]["dtd"]) == {"msp", "knn"}
    exported = tmp_path / "look" / "backbone.pt"
    state = torch.load(exported, weights_only=True)
    assert all(torch.equal(v, cli.model.backbone.state_dict()[k]) for k, v in state.items())

    probe = {"class_path": "robustft.methods.Classifier",
             "init_args": {"num_classes": 10, "backbone_weights": str(exported), "freeze_backbone": True,
                           "scores": ["msp", "energy", "knn"],
                           "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 1.0e-2}}}}
    report_cb = {"class_path": "robustft.callbacks.OODEvaluation",
                 "init_args": {"report_dir": str(tmp_path / "fit_report"), "plots": False}}
    probe_cfg = _cli_config(tmp_path, probe, [report_cb], {}, "probe")
    probe_cli = main(["fit", "--config", str(probe_cfg)])
    # the probe's backbone weights are the exported ones, frozen (BatchNorm running statistics are not
    # compared: Classifier(freeze_backbone=True) leaves the backbone in train mode under Lightning 2.6)
    params = dict(probe_cli.model.backbone.named_parameters())
    assert all(torch.equal(state[k], p) and not p.requires_grad for k, p in params.items())
    ckpt = tmp_path / "probe" / "logs" / "checkpoints" / "last.ckpt"
    main(["evaluate", "--config", str(probe_cfg), "--ckpt_path", str(ckpt), "--report_dir", str(tmp_path / "rep")])
    during_fit = json.loads((tmp_path / "fit_report" / "report.json").read_text())
    evaluated = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert compare_reports(during_fit, evaluated, atol=1e-6) == []
    assert evaluated["id"]["n"] == 200 and set(evaluated["ood"]) == {"dtd"}
    assert evaluated["id"]["acc"] > 0.25  # 10 fine classes (chance 0.1) after 4 probe steps on a random head
    assert evaluated["ood"]["dtd"]["knn"]["auroc"] > 0.55
    assert_matches_expected_report(evaluated, EXPECTED_REPORT)


def test_export_backbone_refuses_a_method_without_backbone() -> None:
    with pytest.raises(TypeError, match="backbone"):
        ExportBackbone().setup(None, pl.LightningModule(), "fit")  # type: ignore[arg-type]
