"""The training contract of ``OODMethod``: named loss terms, manual optimisation, parameter groups,
optimizer / scheduler injection from YAML, ``predict`` with fitted scores and ``configure_scores``."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from robustft.backbones.base import PreprocessConfig
from robustft.cli import main
from robustft.evaluation.engine import evaluate_model
from robustft.methods import Classifier, ConfigMismatchError, OODMethod
from robustft.methods.base import NonFiniteLossError
from robustft.optim import WarmupCosine, build_scheduler, callable_spec

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = str(REPO / "data" / "weights" / "resnet20-12fca82f.th")
TRAIN_5K = str(REPO / "data" / "cifar10" / "cifar10_train_5k_jpeg.npz")
CONFIG = "tests/conf/tiny_classifier.yaml"
MEAN = torch.tensor((0.485, 0.456, 0.406))[:, None, None]
STD = torch.tensor((0.229, 0.224, 0.225))[:, None, None]


def trainer(**kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )


class DictDataset(Dataset):
    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


@functools.lru_cache(maxsize=1)
def real_cifar(n: int = 128) -> tuple[Tensor, Tensor]:
    """``n`` real CIFAR-10 training images, normalised as the ResNet-20 expects."""
    with np.load(TRAIN_5K) as arrays:
        offsets, data = arrays["offsets"], arrays["jpeg_bytes"]
        labels = torch.from_numpy(arrays["labels"][:n]).long()
    import io

    from PIL import Image

    images = np.stack([np.asarray(Image.open(io.BytesIO(data[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
                       for i in range(n)])
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - MEAN) / STD
    return x.contiguous(), labels


# ------------------------------------------------------------------------------------ a two-term method
class TwoTerms(OODMethod):
    """A linear classifier with two loss terms: ``ce`` and a weighted L2 penalty ``l2``."""

    def __init__(self, num_classes: int = 3, penalty: float = 0.5, **kwargs: Any) -> None:
        super().__init__(num_classes, **kwargs)
        self.penalty = penalty
        self.linear = torch.nn.Linear(4, num_classes)
        self.extra = torch.nn.Linear(4, 1)  # a second group for the parameter-group tests

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=2)

    def forward_eval(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"logits": self.linear(batch["image"]) + 0 * self.extra(batch["image"])}

    def training_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = self.forward_eval(batch)["logits"]
        return {
            "ce": F.cross_entropy(logits, batch["label"]),
            "l2": self.penalty * (self.linear.weight**2).sum() + (self.extra.weight**2).sum(),
        }


def _toy_loader(n: int = 8, batch_size: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    y = torch.randint(3, (n,), generator=generator)
    return DataLoader(DictDataset(x, y), batch_size=batch_size)


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.outputs: list[Tensor] = []
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.outputs.append(outputs["loss"].detach() if isinstance(outputs, dict) else outputs)
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


SGD_PLAIN = {"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0}}


def test_terms_are_logged_and_their_sum_is_optimised() -> None:
    torch.manual_seed(0)
    model = TwoTerms(optimizer=SGD_PLAIN, scheduler=None)
    loader = _toy_loader()
    batch = next(iter(loader))
    # the expected step: one SGD step (lr 1) on ce + l2, computed by hand
    reference = TwoTerms(optimizer=SGD_PLAIN, scheduler=None)
    reference.load_state_dict(model.state_dict())
    terms = reference.training_losses(batch)
    expected_total = terms["ce"] + terms["l2"]
    expected_total.backward()
    expected_weight = reference.linear.weight.detach() - reference.linear.weight.grad

    recorder = Recorder()
    trainer(max_steps=1, callbacks=[recorder]).fit(model, train_dataloaders=loader)
    metrics = recorder.metrics[0]
    assert set(metrics) >= {"train/ce", "train/l2", "train/loss"}
    assert metrics["train/ce"] == pytest.approx(float(terms["ce"]), abs=1e-6)
    assert metrics["train/l2"] == pytest.approx(float(terms["l2"]), abs=1e-6)
    assert metrics["train/loss"] == pytest.approx(float(expected_total), abs=1e-6)
    torch.testing.assert_close(recorder.outputs[0], expected_total.detach())
    # the step used the gradient of the SUM (ce alone, or a mean of the terms, gives other weights)
    torch.testing.assert_close(model.linear.weight.detach(), expected_weight, rtol=0, atol=1e-6)


def test_non_finite_term_is_named() -> None:
    model = TwoTerms(penalty=float("inf"), optimizer=SGD_PLAIN, scheduler=None)
    with pytest.raises(NonFiniteLossError, match=r"term 'l2' is inf at global step 0 \(epoch 0\)") as info:
        trainer(max_steps=1).fit(model, train_dataloaders=_toy_loader())
    assert "'ce'" not in str(info.value)


def test_reserved_and_non_scalar_terms_are_refused() -> None:
    model = TwoTerms()
    with pytest.raises(ValueError, match="'loss' is reserved"):
        model.checked_total_loss({"loss": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"\['ce'\] must be a scalar"):
        model.checked_total_loss({"ce": torch.ones(3)})


# ------------------------------------------------------------------------------------ parameter groups
class Grouped(TwoTerms):
    def param_groups(self) -> list[dict[str, Any]]:
        return [
            {"name": "linear", "params": list(self.linear.parameters())},
            {"name": "extra", "params": list(self.extra.parameters()), "lr_mult": 0.1, "wd_mult": 0.0},
        ]


def test_param_group_multipliers_reach_the_optimizer() -> None:
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.5, "weight_decay": 0.01}}
    model = Grouped(optimizer=optimizer, scheduler=None)
    fit = trainer(max_steps=1)
    fit.fit(model, train_dataloaders=_toy_loader())
    (opt,) = fit.optimizers
    assert isinstance(opt, torch.optim.AdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["linear"]["lr"] == 0.5 and groups["linear"]["weight_decay"] == 0.01
    assert groups["extra"]["lr"] == 0.05 and groups["extra"]["weight_decay"] == 0.0
    assert {id(p) for p in groups["extra"]["params"]} == {id(p) for p in model.extra.parameters()}


def test_param_groups_with_a_scheduler_scale_each_group() -> None:
    model = Grouped(
        optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.2}},
        scheduler={"class_path": "robustft.optim.WarmupCosine", "init_args": {"warmup_steps": 2, "total_steps": 4}},
    )
    config = model.configure_optimizers()
    opt, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.01])  # warm-up step 0: factor 1/2
    scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.02])


def test_classifier_backbone_lr_mult_and_frozen_backbone() -> None:
    model = Classifier(num_classes=10, backbone_lr_mult=0.1, scheduler=None)
    opt = model.configure_optimizers()
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(0.001) and groups["head"]["lr"] == 0.01
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 5e-4 for g in opt.param_groups)
    frozen = Classifier(num_classes=10, freeze_backbone=True, scheduler=None).configure_optimizers()
    assert [g["name"] for g in frozen.param_groups] == ["head"]
    with pytest.raises(ConfigMismatchError, match="backbone_lr_mult"):
        Classifier(num_classes=10, backbone_lr_mult=0.0)


def test_param_groups_must_cover_every_trainable_parameter() -> None:
    class Forgetful(TwoTerms):
        def param_groups(self) -> list[dict[str, Any]]:
            return [{"params": list(self.linear.parameters())}]

    with pytest.raises(ValueError, match=r"leaves out trainable parameters \['extra.weight', 'extra.bias'\]"):
        Forgetful().configure_optimizers()

    class FixedLr(TwoTerms):
        def param_groups(self) -> list[dict[str, Any]]:
            return [{"params": list(self.parameters()), "lr": 0.1}]

    with pytest.raises(ValueError, match="lr_mult"):
        FixedLr().configure_optimizers()


# ------------------------------------------------------------------------------------ defaults and specs
def test_python_built_methods_get_the_default_optimizer() -> None:
    config = Classifier(num_classes=10).configure_optimizers()
    opt, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert type(opt) is torch.optim.SGD
    assert {(g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) for g in opt.param_groups} == {
        (0.01, 0.9, 5e-4, False)
    }
    assert isinstance(scheduler, WarmupCosine) and scheduler.warmup_steps == 0 and config["lr_scheduler"]["interval"] == "step"


def test_callables_are_stored_as_specs_in_checkpoints() -> None:
    model = TwoTerms(optimizer=functools.partial(torch.optim.Adam, lr=0.3), scheduler=None)
    model.save_hyperparameters({"optimizer": model.optimizer_config, "scheduler": None})
    checkpoint = {"hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["hyper_parameters"]["optimizer"] == {"class_path": "torch.optim.adam.Adam", "init_args": {"lr": 0.3}}
    assert callable_spec(torch.optim.SGD) == {"class_path": "torch.optim.sgd.SGD", "init_args": {}}
    assert callable_spec(lambda params: torch.optim.SGD(params, lr=1.0)) is None


# ------------------------------------------------------------------------------------ WarmupCosine
def test_warmup_cosine_values_are_exact() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    scheduler = build_scheduler(
        opt, {"class_path": "robustft.optim.WarmupCosine", "init_args": {"warmup_steps": 2}}, total_steps=6
    )
    assert scheduler.total_steps == 6  # filled in, as configure_optimizers does with the trainer's steps
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    cos = [0.5 * (1 + math.cos(math.pi * p / 4)) for p in range(5)]
    expected = [0.05, 0.1, 0.1 * cos[0], 0.1 * cos[1], 0.1 * cos[2], 0.1 * cos[3], 0.0, 0.0]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[3] == pytest.approx(0.1 * (0.5 + 0.5 * math.sqrt(0.5)), abs=1e-12)
    # constant after the warm-up, and no cosine before total_steps is known
    flat = WarmupCosine(torch.optim.SGD([param], lr=0.1), warmup_steps=1, cosine=False, total_steps=3)
    assert [flat.factor(t) for t in range(5)] == [1.0] * 5
    assert WarmupCosine(torch.optim.SGD([param], lr=0.1)).factor(100) == 1.0


# ------------------------------------------------------------------------------------ manual optimisation
class TwoStepsPerBatch(Classifier):
    """Manual optimisation example: one optimizer step per half-batch (as Local-Prompt steps per view),
    gradients clipped to ``clip``. Only the head trains on the real pre-trained ResNet-20 features."""

    def __init__(self, clip: float = 0.05, **kwargs: Any) -> None:
        super().__init__(num_classes=10, backbone_weights=WEIGHTS, freeze_backbone=True, **kwargs)
        self.automatic_optimization = False
        self.manual_clip_val = clip
        torch.nn.init.normal_(self.head.weight, std=0.01)  # forget the pre-trained head
        torch.nn.init.zeros_(self.head.bias)

    def total_training_steps(self) -> int:
        return 2 * super().total_training_steps()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        half = len(batch["label"]) // 2
        for part in (slice(0, half), slice(half, None)):
            view = {k: v[part] for k, v in batch.items()}
            self.manual_step(self.training_losses(view), batch_size=half)


class GradNorms(pl.Callback):
    """Grad norm before clipping (the callback hook runs before the module's, which clips) and the
    norm of the gradients the optimizer used (a step post-hook: clipping is in place, and under
    Lightning the clipping runs inside ``optimizer.step``'s closure, before the update)."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.at_step: list[float] = []

    @staticmethod
    def norm(optimizer: torch.optim.Optimizer) -> float:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.optimizers[0].register_step_post_hook(lambda opt, args, kwargs: self.at_step.append(self.norm(opt)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before.append(self.norm(optimizer))


def test_manual_optimisation_lowers_the_loss_and_clips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = real_cifar(128)
    model = TwoStepsPerBatch(
        clip=0.05,
        optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5, "momentum": 0.9}},
    )

    def mean_loss() -> float:
        with torch.no_grad():
            return float(model.training_losses({"image": x, "label": y})["ce"])

    model.eval()
    initial = mean_loss()
    norms = GradNorms()
    fit = trainer(max_epochs=3, callbacks=[norms], default_root_dir=str(tmp_path))
    fit.fit(model, train_dataloaders=DataLoader(DictDataset(x, y), batch_size=32, shuffle=False))
    model.eval()
    final = mean_loss()
    assert len(norms.at_step) == 3 * 4 * 2 == fit.global_step  # two optimizer steps per batch
    assert max(norms.at_step) <= 0.05 * (1 + 1e-5), norms.at_step
    assert max(norms.before) > 0.05  # the clipping did something
    assert initial > 2.2 and final < 0.8 * initial, (initial, final)
    # the per-step scheduler stepped after every manual step and reached the end of its cosine
    scheduler = fit.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps == 24 and scheduler.last_epoch == 24
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert "train/ce" in fit.callback_metrics and "train/loss" in fit.callback_metrics


def test_manual_step_refuses_automatic_optimisation() -> None:
    with pytest.raises(RuntimeError, match="automatic_optimization = False"):
        TwoTerms().manual_step({"ce": torch.tensor(1.0)})


# ------------------------------------------------------------------------------------ configure_scores
def test_configure_scores_validates_and_rebuilds_lazily() -> None:
    model = Classifier(num_classes=10, scores=["msp", "knn"], score_kwargs={"knn": {"k": 5}})
    first = model.scores
    assert first["knn"].hparams["k"] == 5
    model.configure_scores(score_kwargs={"knn": {"k": 7}})
    assert model.score_names == ["msp", "knn"] and model.scores["knn"].hparams["k"] == 7
    assert model.scores["knn"] is not first["knn"]
    model.configure_scores(scores=["energy"], score_kwargs={})
    assert list(model.scores) == ["energy"] and model.score_kwargs == {}
    with pytest.raises(ConfigMismatchError, match="Did you mean 'energy'"):
        model.configure_scores(scores=["enrgy"])
    with pytest.raises(ConfigMismatchError, match=r"names \['knn'\]"):
        model.configure_scores(score_kwargs={"knn": {"k": 3}})
    assert model.score_names == ["energy"]  # a refused change leaves the configuration as it was


# ------------------------------------------------------------------------------------ the real CLI
@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """``fit`` through the real CLI with AdamW chosen in YAML (one training step, no evaluation)."""
    out = tmp_path_factory.mktemp("adamw")
    override = out / "optim.yaml"
    override.write_text(yaml.safe_dump({
        "trainer": {
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}],
            "max_steps": 1,
            "limit_val_batches": 0,
            "logger": False,
            "default_root_dir": str(out),
        },
        "model": {"init_args": {
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003, "weight_decay": 0.02}},
            "scheduler": {"class_path": "robustft.optim.WarmupCosine", "init_args": {"warmup_steps": 3}},
        }},
    }))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        cli = main(["fit", "--config", CONFIG, "--config", str(override)])
    return cli, out


def test_optimizer_from_yaml_is_the_one_used(adamw_run) -> None:
    cli, out = adamw_run
    (opt,) = cli.trainer.optimizers
    assert type(opt) is torch.optim.AdamW
    assert {(g["initial_lr"], g["weight_decay"]) for g in opt.param_groups} == {(0.003, 0.02)}
    assert "momentum" not in opt.defaults  # nothing of the default SGD leaked in
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, WarmupCosine) and scheduler.warmup_steps == 3 and scheduler.total_steps == 1
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.002, 0.002])  # after one warm-up step: 2/3
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    hparams = ckpt["hyper_parameters"]
    assert hparams["_class_path"] == "robustft.methods.Classifier"
    assert hparams["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert hparams["optimizer"]["init_args"]["lr"] == 0.003
    assert hparams["scheduler"]["init_args"]["warmup_steps"] == 3


def test_print_config_reloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(REPO)
    override = ["--model.init_args.optimizer", "torch.optim.Adam", "--model.init_args.optimizer.lr", "0.004"]
    with pytest.raises(SystemExit):
        main(["fit", "--config", CONFIG, *override, "--print_config"])
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["init_args"]["optimizer"]["class_path"] == "torch.optim.Adam"
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.004
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == config


def test_predict_with_knn_fits_the_reference_and_matches_evaluate(adamw_run, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``predict`` of a checkpoint (no model section: it comes from the checkpoint) with KNN gives the
    scores the evaluation engine gives for the same ID test samples."""
    _, out = adamw_run
    ckpt = out / "checkpoints" / "last.ckpt"
    monkeypatch.chdir(REPO)
    data = yaml.safe_load((REPO / CONFIG).read_text())["data"]
    config = tmp_path / "predict.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path)},
        "data": data,
    }))
    cli = main(["predict", "--config", str(config), "--ckpt_path", str(ckpt),
                "--model.init_args.scores", "[knn, msp]", "--model.init_args.score_kwargs", "{knn: {k: 10}}"])
    batches = cli.trainer.predict_loop.predictions
    predicted = {k: torch.cat([b[k] for b in batches]) for k in ("index", "knn", "msp", "prediction")}
    order = predicted["index"].argsort()
    model, datamodule = cli.model, cli.datamodule
    assert model.scores["knn"].hparams["k"] == 10
    result = evaluate_model(model, datamodule)
    assert len(order) == len(result.id_scores["knn"]) == 400
    torch.testing.assert_close(predicted["knn"][order], result.id_scores["knn"], rtol=0, atol=1e-6)
    torch.testing.assert_close(predicted["msp"][order], result.id_scores["msp"], rtol=0, atol=1e-6)
