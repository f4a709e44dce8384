"""LEVI (frozen F read at several layers + small G from scratch + adapting layers): the spec's CPU list
(``methods-robust-finetuning.md`` section 1(g)) and the real CLI.

- F is bit-identical after optimizer steps (parameters and BatchNorm buffers) and stays in eval mode
  while the module trains;
- the adapter's input is ``sum(d_l) + d_s`` wide, each slice is LayerNorm(pool(level l)) computed here
  independently, and changing S changes exactly the slices of the changed layers;
- no forward hooks anywhere, and a reloaded model gives the same views (nothing captured twice);
- reductions: G off + S = {last} is an MLP probe on F's pooled features (same logits before and after
  training steps); S = {} is G + the adapter trained alone (same seed, same logits, F never run);
- gradients reach G, the adapters and LoRA (when configured), never F's own weights;
- the feature cache equals fresh features and is refused with augmentation;
- a micro ``fit`` through the real CLI, ``evaluate`` of its checkpoint (compared with the stored
  report) and ``average --alphas [1]`` for the covariate-shifted sets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from micro_cli import assert_matches_expected_report, write_micro_config
from torch import nn

from robustft.cli import main
from robustft.data import OODDataModule
from robustft.methods.base import ConfigMismatchError
from robustft.methods.levi import LEVI
from robustft.methods.levi.modules import SmallCNN, mlp_head
from robustft.ood.report import compare_reports

REPO = Path(__file__).resolve().parents[2]
EXPECTED_REPORT = REPO / "tests" / "expected" / "levi_micro_report.json"
RESNET20 = str(REPO / "data/weights/resnet20-12fca82f.th")
MICRO_CLIP = "clip:robustft-micro-vit"  # random weights: structure only
SMALL = {"kind": "cnn", "widths": [8, 16]}


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _levi(backbone: str = "cifar_resnet20", **kwargs: Any) -> LEVI:
    weights = RESNET20 if backbone == "cifar_resnet20" else None
    kwargs.setdefault("small_model", SMALL)
    kwargs.setdefault("adapter_hidden", 32)
    return LEVI(num_classes=10, backbone=backbone, backbone_weights=weights, scheduler=None, **kwargs)


def _batch(seed: int = 0, b: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(b, 3, 32, 32, generator=g), "label": torch.randint(0, 10, (b,), generator=g),
            "index": torch.arange(b)}


def _steps(model: LEVI, n: int = 3) -> None:
    optimizer = model.configure_optimizers()
    model.train()
    for i in range(n):
        loss = model.total_loss(model.training_losses(_batch(i)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("backbone", ["cifar_resnet20", MICRO_CLIP])
def test_frozen_backbone_is_bitwise_unchanged_and_stays_in_eval_mode(backbone: str) -> None:
    torch.manual_seed(0)
    model = _levi(backbone).train()
    assert model.training and model.adapter.training and model.small_model.training
    assert not any(m.training for m in model.backbone.modules())
    f_before, g_before = _state(model.backbone), _state(model.small_model)
    _steps(model)
    assert not any(m.training for m in model.backbone.modules())
    f_after = _state(model.backbone)
    assert f_before.keys() == f_after.keys()
    assert all(torch.equal(f_before[k], f_after[k]) for k in f_before)  # weights and BatchNorm statistics
    assert any(not torch.equal(g_before[k], v) for k, v in _state(model.small_model).items())  # G did train
    assert all(not p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("lora", [False, True])
def test_gradients_reach_g_and_adapters_never_f(lora: bool) -> None:
    kwargs: dict[str, Any] = {}
    if lora:
        pytest.importorskip("peft")
        kwargs["lora"] = {"r": 4, "lora_alpha": 8, "target_modules": ["conv1", "conv2"]}
    torch.manual_seed(0)
    model = _levi(adapter_mode="concat", **kwargs).train()
    model.total_loss(model.training_losses(_batch())).backward()
    for name, param in [*model.small_model.named_parameters(), *model.adapter.named_parameters()]:
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name
    lora_names = {n for n, _ in model.backbone.named_parameters() if "lora_" in n}
    for name, param in model.backbone.named_parameters():
        if name in lora_names:
            continue
        assert param.grad is None, name
    groups = {g["name"]: g for g in model.configure_optimizers().param_groups}
    assert groups["levi"]["lr"] == pytest.approx(1e-3)
    if lora:
        assert lora_names and groups["lora"]["lr"] == pytest.approx(1e-4)  # lora_lr_mult 0.1
        # LoRA's B starts at zero, so A gets no gradient at the first step but B does
        grads = [p.grad for n, p in model.backbone.named_parameters() if "lora_B" in n]
        assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)
    else:
        assert set(groups) == {"levi"} and not lora_names


def test_adapter_input_is_layernormed_pooled_levels_and_layer_set_changes_only_its_slices() -> None:
    torch.manual_seed(0)
    a = _levi(layers=[1, 3]).eval()
    b = _levi(layers=[2, -1]).eval()
    b.small_model.load_state_dict(a.small_model.state_dict())
    x = _batch()["image"]
    with torch.no_grad():
        levels = a.backbone.forward_intermediates(x, None)  # every level, independently of LEVI
        pooled = {i: v.mean(dim=(2, 3)) for i, v in levels.items()}
        u = a.small_model(x)
        in_a, in_b = a.adapter.adapter_input(a.views(x)), b.adapter.adapter_input(b.views(x))
    d = {i: v.shape[1] for i, v in pooled.items()}  # 16, 16, 32, 64 channels
    assert b.layers == [2, 3]
    assert in_a.shape[1] == a.adapter.input_width == d[1] + d[3] + u.shape[1] == 16 + 64 + 16
    assert in_b.shape[1] == b.adapter.input_width == d[2] + d[3] + u.shape[1] == 32 + 64 + 16

    def ln(v: torch.Tensor) -> torch.Tensor:  # the LayerNorms are at their initial (identity) affine
        return F.layer_norm(v, (v.shape[1],))

    torch.testing.assert_close(in_a[:, :16], ln(pooled[1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(in_b[:, :32], ln(pooled[2]), rtol=1e-5, atol=1e-5)
    assert torch.equal(in_a[:, 16:80], in_b[:, 32:96])  # layer 3's slice: the same
    assert torch.equal(in_a[:, 80:], in_b[:, 96:])  # G's slice: the same
    torch.testing.assert_close(in_a[:, 16:80], ln(pooled[3]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(in_a[:, 80:], ln(u), rtol=1e-5, atol=1e-5)
    # per-layer mode: one head per F layer on [LN(h_l); LN(u)], logits averaged
    p = _levi(layers=[1, 3], adapter_mode="per_layer").eval()
    p.small_model.load_state_dict(a.small_model.state_dict())
    with torch.no_grad():
        inputs = p.adapter.head_inputs(p.views(x))
        assert [t.shape[1] for t in inputs] == [16 + 16, 64 + 16]
        want = (p.adapter.heads[0](torch.cat([ln(pooled[1]), ln(u)], 1)) + p.adapter.heads[1](torch.cat([ln(pooled[3]), ln(u)], 1))) / 2
        torch.testing.assert_close(p(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", ["cifar_resnet20", MICRO_CLIP])
def test_no_hooks_and_a_reloaded_model_gives_the_same_views(backbone: str) -> None:
    torch.manual_seed(0)
    model = _levi(backbone)
    _steps(model, 1)
    model.eval()
    size = model.preprocess.image_size
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        want = model.forward_eval({"image": x})
    state = model.state_dict()
    again = _levi(backbone)
    for _ in range(2):  # loading twice must not add anything that captures features
        again.load_state_dict(state, strict=True)
        again.on_load_checkpoint({"robustft": {"method": "robustft.methods.levi.LEVI", "num_classes": 10}})
    again.eval()
    for m in (model, again):
        assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
    with torch.no_grad():
        got = again.forward_eval({"image": x})
        repeat = again.forward_eval({"image": x})
    assert got["views"].shape[1] == model.adapter.input_width
    for key in want:
        assert torch.equal(want[key], got[key]) and torch.equal(got[key], repeat[key]), key


def test_g_off_and_last_layer_is_an_mlp_probe_on_f_features() -> None:
    torch.manual_seed(0)
    levi = _levi(small_model=None, layers=[-1], adapter_hidden=32, adapter_dropout=0.1)
    probe = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 10))
    probe.load_state_dict({f"{'0' if k.startswith('norms') else str(int(k.split('.')[2]) + 1)}.{k.split('.')[-1]}": v
                           for k, v in levi.adapter.state_dict().items()})
    frozen = levi.backbone
    ref_opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.05)
    levi_opt = levi.configure_optimizers()
    levi.train(), probe.train()
    for step in range(3):
        batch = _batch(step)
        with torch.no_grad():
            features = frozen(batch["image"])  # F's own pooled output
        torch.manual_seed(100 + step)  # the same dropout masks in both
        ref_loss = F.cross_entropy(probe(features), batch["label"])
        torch.manual_seed(100 + step)
        loss = levi.training_losses(batch)["ce"]
        assert torch.equal(loss, ref_loss)
        for opt, value in ((ref_opt, ref_loss), (levi_opt, loss)):
            opt.zero_grad()
            value.backward()
            opt.step()
    levi.eval(), probe.eval()
    x = _batch(9)["image"]
    with torch.no_grad():
        assert torch.equal(levi(x), probe(frozen(x)))


@pytest.mark.parametrize("backbone", ["cifar_resnet20", MICRO_CLIP])
def test_no_layers_is_g_alone_same_seed_same_logits(backbone: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    levi = _levi(backbone, layers=[], adapter_hidden=32, adapter_dropout=0.1)
    torch.manual_seed(0)  # an independent G + head built from the same seed
    ref = nn.Sequential(SmallCNN([8, 16]), nn.LayerNorm(16), *mlp_head(16, 32, 10, 0.1))
    trained = [*levi.small_model.named_parameters(), *levi.adapter.named_parameters()]
    for (name, a), (_, b) in zip(trained, ref.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    monkeypatch.setattr(levi.backbone, "forward_intermediates", lambda *a, **k: pytest.fail("F ran with layers: []"))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.05)
    levi_opt = levi.configure_optimizers()
    levi.train(), ref.train()
    for step in range(3):
        batch = _batch(step)
        torch.manual_seed(step)
        ref_loss = F.cross_entropy(ref(batch["image"]), batch["label"])
        torch.manual_seed(step)
        loss = levi.training_losses(batch)["ce"]
        assert torch.equal(loss, ref_loss)
        for opt, value in ((ref_opt, ref_loss), (levi_opt, loss)):
            opt.zero_grad()
            value.backward()
            opt.step()
    levi.eval(), ref.eval()
    x = _batch(9)["image"]
    with torch.no_grad():
        assert torch.equal(levi(x), ref(x))


def test_feature_cache_equals_fresh_features_and_is_refused_with_augmentation(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    cached = _levi(cache_features=True, adapter_dropout=0.0).train()
    fresh = _levi(adapter_dropout=0.0).train()
    fresh.load_state_dict(cached.state_dict())
    calls = []
    original = cached.backbone.forward_intermediates
    monkeypatch.setattr(cached.backbone, "forward_intermediates", lambda *a, **k: calls.append(1) or original(*a, **k))
    batch = _batch()
    for _ in range(2):  # a second epoch over the same images reads the cache
        assert torch.equal(cached.training_losses(batch)["ce"], fresh.training_losses(batch)["ce"])
    assert len(calls) == 1
    # new indices (and a shuffled order) are computed once and looked up by index
    shuffled = {"image": batch["image"].flip(0), "label": batch["label"].flip(0), "index": batch["index"].flip(0)}
    assert torch.equal(cached.training_losses(shuffled)["ce"], fresh.training_losses(shuffled)["ce"])
    assert len(calls) == 1
    cached.eval()  # evaluation never reads the cache
    cached.forward_eval(batch)
    assert len(calls) == 2

    data = OODDataModule(train={"source": "npz", "path": str(REPO / "data/cifar10/cifar10_train_5k_jpeg.npz"), "max_samples": 16},
                         test={"source": "npz", "path": str(REPO / "data/cifar10/cifar10_test_2k.npz"), "max_samples": 16},
                         augmentation="crop_flip", val_fraction=0.0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigMismatchError, match="data.augmentation: none"):
        trainer.fit(_levi(cache_features=True), datamodule=data)


def test_lora_on_an_attention_out_proj_is_refused_and_on_the_attention_module_trains() -> None:
    """nn.MultiheadAttention never calls its out_proj: LoRA there would silently train nothing."""
    pytest.importorskip("peft")
    with pytest.raises(ConfigMismatchError, match="attn"):
        _levi(MICRO_CLIP, lora={"r": 2, "target_modules": ["out_proj", "c_fc"]})
    model = _levi(MICRO_CLIP, lora={"r": 2, "lora_alpha": 4, "target_modules": ["attn", "c_fc", "c_proj"]}).train()
    model.total_loss(model.training_losses(_batch())).backward()
    b_grads = {n: p.grad for n, p in model.backbone.named_parameters() if "lora_B" in n}
    assert any(".attn." in n for n in b_grads) and all(g is not None and float(g.abs().sum()) > 0 for g in b_grads.values())
    assert all(p.grad is None for n, p in model.backbone.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"layers": [7]}, "model.layers"),
    ({"adapter_mode": "sum"}, "model.adapter_mode"),
    ({"token_pool": "max"}, "model.token_pool"),
    ({"small_model": {"kind": "mlp"}}, "model.small_model.kind"),
    ({"small_model": {"kind": "cnn", "depth": 3}}, "model.small_model"),
    ({"small_model": None, "layers": []}, "model.layers is empty"),
    ({"adapter_hidden": -1}, "model.adapter_hidden"),
    ({"cache_features": True, "lora": {"r": 2, "target_modules": ["conv1"]}}, "model.cache_features"),
    ({"lora": {"r": 2}}, "model.lora.target_modules"),
    ({"lora": {"r": 2, "target_modules": ["nothing_named_so"]}}, "model.lora"),
])
def test_bad_configuration_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    if "lora" in kwargs and "cache_features" not in kwargs:
        pytest.importorskip("peft")
    with pytest.raises(ConfigMismatchError, match=field.replace(".", r"\.")):
        _levi(**kwargs)


MICRO_CONFIG: dict[str, Any] = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 1,
                "num_sanity_val_steps": 0, "deterministic": True, "enable_progress_bar": False,
                "enable_model_summary": False},
    "model": {"class_path": "robustft.methods.levi.LEVI",
              "init_args": {"num_classes": 10, "backbone": "cifar_resnet20",
                            "backbone_weights": "data/weights/resnet20-12fca82f.th",
                            "layers": [2, 3], "small_model": {"kind": "cnn", "widths": [16, 32]},
                            "adapter_hidden": 64, "cache_features": True,
                            "scores": ["msp", "energy", "knn"],
                            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3.0e-3, "weight_decay": 0.05}},
                            "scheduler": None}},
    "data": {"class_path": "robustft.data.OODDataModule",
             "init_args": {"train": {"source": "npz", "path": "data/cifar10/cifar10_train_5k_jpeg.npz", "max_samples": 500},
                           "test": {"source": "npz", "path": "data/cifar10/cifar10_test_2k.npz", "max_samples": 200},
                           "ood": {"far": {"dtd": {"source": "npz", "path": "data/dtd/dtd_10class_32.npz", "max_samples": 100}}},
                           "augmentation": "none", "val_fraction": 0.1,
                           "batch_size": 64, "eval_batch_size": 200}},
}


@pytest.mark.slow
def test_micro_fit_through_the_cli_then_evaluate_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    path = write_micro_config(MICRO_CONFIG, tmp_path, "levi")
    cli = main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 6
    # the cache holds F's features of exactly the images trained on (two epochs of 3 shuffled batches)
    model, filled = cli.model, cli.model._cache_filled.nonzero().flatten()
    assert 3 * 64 < len(filled) <= 6 * 64
    train = cli.datamodule.train_dataset()
    images = torch.stack([train[int(i)]["image"] for i in filled[:32]])
    with torch.no_grad():
        torch.testing.assert_close(model._cache[filled[:32]], torch.cat(model.eval().backbone_views(images), 1),
                                   rtol=1e-5, atol=1e-5)
    ckpt = tmp_path / "tb" / "checkpoints" / "last.ckpt"
    main(["evaluate", "--config", str(path), "--ckpt_path", str(ckpt), "--report_dir", str(tmp_path / "rep")])
    during_fit = json.loads((tmp_path / "fit_report" / "report.json").read_text())
    evaluated = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert compare_reports(during_fit, evaluated, atol=1e-6) == []
    assert evaluated["id"]["n"] == 200 and set(evaluated["ood"]) == {"dtd"}
    # a from-scratch adapter over the real ResNet-20's layers learns in 6 steps; DTD is told apart
    assert evaluated["id"]["acc"] > 0.5 and evaluated["ood"]["dtd"]["msp"]["auroc"] > 0.6
    # covariate shift through `average` (alpha = 1: exactly the fine-tuned checkpoint)
    main(["average", "--config", str(path), "--finetuned_ckpt", str(ckpt), "--alphas", "[1.0]",
          "--corruptions", "[gaussian_noise]", "--severities", "[5]", "--report_dir", str(tmp_path / "avg")])
    row = json.loads((tmp_path / "avg" / "average.json").read_text())["rows"][0]
    assert row["id_acc"] == evaluated["id"]["acc"] and 0.1 < row["shift/gaussian_noise-5"] < row["id_acc"] + 0.05
    # CI's checkpoint evaluation: the same micro run must reproduce the stored report
    assert_matches_expected_report(evaluated, EXPECTED_REPORT)
