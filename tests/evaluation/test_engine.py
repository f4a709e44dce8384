"""The evaluation engine shared by the callback and ``evaluate``: once-per-sample, tuning on OOD-val only."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from robustft.callbacks.ood_eval import OODEvaluation, flatten_report
from robustft.data import DatasetSpec, OODDataModule
from robustft.data.datamodule import sample_eval_set
from robustft.evaluation import engine
from robustft.evaluation.engine import EvaluationConfigError, evaluate_model
from robustft.methods import Classifier

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
WEIGHTS = str(DATA / "weights" / "resnet20-12fca82f.th")


def _spec(path: Path, source: str = "npz", **kw) -> DatasetSpec:
    return DatasetSpec(source=source, path=str(path), **kw)


@pytest.fixture(scope="module")
def datamodule() -> OODDataModule:
    dm = OODDataModule(
        train=_spec(DATA / "cifar10" / "cifar10_train_5k_jpeg.npz", max_samples=300),
        test=_spec(DATA / "cifar10" / "cifar10_test_2k.npz", max_samples=300),
        ood={
            "near": {"tin": _spec(DATA / "tinyimagenet" / "tin_test_32.npz", max_samples=150)},
            "far": {
                "mnist": _spec(DATA / "mnist", source="mnist", max_samples=150),
                "dtd": _spec(DATA / "dtd" / "dtd_10class_32.npz", max_samples=150),
            },
        },
        ood_val={"tin_val": _spec(DATA / "tinyimagenet" / "tin_val_32.npz", max_samples=100)},
        eval_batch_size=64,
    )
    dm.setup("test")
    return dm


def _model(scores: list[str]) -> Classifier:
    torch.manual_seed(0)
    return Classifier(num_classes=10, backbone="cifar_resnet20", backbone_weights=WEIGHTS, scores=scores).eval()


def test_report_matches_independent_computation(datamodule: OODDataModule) -> None:
    model = _model(["msp", "energy"])
    result = evaluate_model(model, datamodule, device=torch.device("cpu"))
    report = result.report
    # independent reference: plain loop over the raw datasets with sklearn
    def logits_of(dataset) -> torch.Tensor:
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        with torch.no_grad():
            return model(images)

    id_logits = logits_of(datamodule.test_dataset())
    id_msp = id_logits.softmax(1).amax(1).numpy()
    labels = datamodule.test_dataset().labels
    assert report["id"]["acc"] == pytest.approx(float((id_logits.argmax(1).numpy() == labels).mean()), abs=1e-9)
    assert report["id"]["n"] == 300
    for name, dataset in datamodule.ood_datasets("test").items():
        ood_msp = logits_of(dataset).softmax(1).amax(1).numpy()
        truth = np.r_[np.ones(len(id_msp)), np.zeros(len(ood_msp))]
        expected = roc_auc_score(truth, np.r_[id_msp, ood_msp])
        assert report["ood"][name]["msp"]["auroc"] == pytest.approx(expected, abs=1e-5)
        assert report["ood"][name]["msp"]["n"] == 150
    far = report["groups"]["far"]["energy"]["auroc"]
    assert far == pytest.approx((report["ood"]["mnist"]["energy"]["auroc"] + report["ood"]["dtd"]["energy"]["auroc"]) / 2)
    assert report["groups"]["near"]["msp"]["sets"] == ["tin"]


def test_each_sample_goes_through_forward_eval_once(datamodule: OODDataModule, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(["msp", "energy", "maxlogit"])
    seen: list[int] = []
    original = model.forward_eval

    def counting(batch):
        seen.append(len(batch["image"]))
        return original(batch)

    monkeypatch.setattr(model, "forward_eval", counting)
    evaluate_model(model, datamodule, device=torch.device("cpu"))
    assert sum(seen) == 300 + 3 * 150  # ID test + OOD sets, no reference pass (no fitted score), no repeats


def test_reference_pass_only_for_fitted_scores(datamodule: OODDataModule, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(["msp", "knn"])
    sizes: list[int] = []
    original = engine.collect_outputs

    def recording(m, dm, dataset, device, *args):
        sizes.append(len(dataset))
        return original(m, dm, dataset, device, *args)

    monkeypatch.setattr(engine, "collect_outputs", recording)
    evaluate_model(model, datamodule, device=torch.device("cpu"))
    assert sizes[0] == len(datamodule.reference_dataset())  # reference first, once
    assert sizes.count(len(datamodule.reference_dataset())) == 1


def test_tuning_uses_ood_validation_sets_only(datamodule: OODDataModule, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(["knn", "react"])
    used: list[object] = []
    original = engine.collect_outputs

    def recording(m, dm, dataset, device, *args):
        used.append(dataset)
        return original(m, dm, dataset, device, *args)

    monkeypatch.setattr(engine, "collect_outputs", recording)
    tuned = engine.tune_on_ood_val(model, datamodule, torch.device("cpu"), original(model, datamodule, datamodule.reference_dataset(), torch.device("cpu")))
    test_sets = list(datamodule.ood_datasets("test").values()) + [datamodule.test_dataset()]
    assert not any(any(d is t for t in test_sets) for d in used)
    assert set(tuned) == {"knn", "react"}
    assert model.score_kwargs["knn"]["k"] in (1, 10, 20, 50, 100, 200)
    assert model.score_kwargs["react"]["percentile"] in (85, 90, 95, 99)


def test_no_ood_sets_is_refused_before_work() -> None:
    dm = OODDataModule(
        train=_spec(DATA / "cifar10" / "cifar10_train_5k_jpeg.npz", max_samples=50),
        test=_spec(DATA / "cifar10" / "cifar10_test_2k.npz", max_samples=50),
    )
    dm.setup("test")
    with pytest.raises(EvaluationConfigError, match="data.ood: no OOD sets"):
        evaluate_model(_model(["msp"]), dm)


def test_score_needing_features_is_refused_for_logit_only_method(datamodule: OODDataModule) -> None:
    model = _model(["knn"])
    model.output_keys = lambda: {"logits"}  # a method that exposes no features
    model.configure_scores()  # rebuild the scores against the new outputs
    with pytest.raises(ValueError, match="score 'knn' needs outputs"):
        evaluate_model(model, datamodule)


def test_flattened_keys(datamodule: OODDataModule) -> None:
    model = _model(["msp"])
    result = evaluate_model(model, datamodule)
    flat = flatten_report(result.report)
    assert {"id/acc", "ood/tin/msp/auroc", "ood/near/msp/fpr95", "ood/far/msp/aupr_out"} <= set(flat)


def test_max_samples_evaluates_a_fixed_seeded_subset(datamodule: OODDataModule) -> None:
    """Per-epoch monitoring on subsets: n is capped, the subset is the same every time, and the numbers
    equal an independent computation on exactly those samples."""
    model = _model(["msp"])
    report = evaluate_model(model, datamodule, device=torch.device("cpu"), max_samples=100).report
    again = evaluate_model(model, datamodule, device=torch.device("cpu"), max_samples=100).report
    assert report["ood"] == again["ood"] and report["id"] == again["id"]
    assert report["id"]["n"] == 100 and report["meta"]["max_samples_per_set"] == 100
    assert all(report["ood"][name]["msp"]["n"] == 100 for name in ("tin", "mnist", "dtd"))

    def msp_and_labels(dataset) -> tuple[np.ndarray, np.ndarray]:
        subset = sample_eval_set(dataset, 100)
        assert [subset[i]["index"] for i in range(len(subset))] == list(range(100))
        images = torch.stack([subset[i]["image"] for i in range(len(subset))])
        with torch.no_grad():
            logits = model(images)
        return logits.softmax(1).amax(1).numpy(), (logits.argmax(1).numpy() == subset.labels)

    id_msp, id_correct = msp_and_labels(datamodule.test_dataset())
    assert report["id"]["acc"] == pytest.approx(float(id_correct.mean()), abs=1e-9)
    ood_msp, _ = msp_and_labels(datamodule.ood_datasets("test")["dtd"])
    expected = roc_auc_score(np.r_[np.ones(100), np.zeros(100)], np.r_[id_msp, ood_msp])
    assert report["ood"]["dtd"]["msp"]["auroc"] == pytest.approx(expected, abs=1e-5)
    # a cap above the set size is the full set itself
    assert sample_eval_set(datamodule.test_dataset(), 10_000) is datamodule.test_dataset()


def test_callback_monitors_subsets_per_epoch_and_reports_full_sets_at_the_end(
    datamodule: OODDataModule, tmp_path: Path
) -> None:
    model = _model(["msp"]).train()
    callback = OODEvaluation(every_n_epochs=1, epoch_max_samples=100, plots=False, report_dir=str(tmp_path / "report"))
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )
    trainer.fit(model, datamodule=datamodule)
    # the logged per-epoch number is the subset evaluation of the weights the epoch ended with
    subset = evaluate_model(model, datamodule, device=torch.device("cpu"), max_samples=100).report
    logged = trainer.callback_metrics["ood/dtd/msp/auroc"].item()
    assert logged == pytest.approx(subset["ood"]["dtd"]["msp"]["auroc"], abs=1e-6)
    # ... and the report written at the end of fit covers the full sets
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert written["id"]["n"] == 300 and written["ood"]["dtd"]["msp"]["n"] == 150
    assert "max_samples_per_set" not in written["meta"]
    full = evaluate_model(model, datamodule, device=torch.device("cpu")).report
    assert written["ood"]["dtd"]["msp"]["auroc"] == pytest.approx(full["ood"]["dtd"]["msp"]["auroc"], abs=1e-9)


def test_epoch_max_samples_must_be_positive() -> None:
    with pytest.raises(ValueError, match="epoch_max_samples"):
        OODEvaluation(epoch_max_samples=0)


def test_forward_passes_run_in_the_trainers_precision(datamodule: OODDataModule, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attached to a ``bf16-mixed`` trainer, evaluation runs forward_eval under the trainer's autocast, as
    training does; scores are computed from float32 outputs and the report is built."""
    model = _model(["msp", "energy"])
    seen: list[tuple[bool, torch.dtype]] = []
    original = model.forward_eval

    def recording(batch):
        outputs = original(batch)
        seen.append((torch.is_autocast_enabled("cpu"), outputs["logits"].dtype))
        return outputs

    monkeypatch.setattr(model, "forward_eval", recording)
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False)
    model.trainer = trainer  # what fit / test / evaluate do
    result = evaluate_model(model, datamodule, device=torch.device("cpu"), max_samples=40)
    assert len(seen) == 4 and all(autocast and dtype == torch.bfloat16 for autocast, dtype in seen)
    assert result.id_scores["msp"].dtype == torch.float32
    assert result.report["id"]["n"] == 40 and 0.0 <= result.report["ood"]["dtd"]["msp"]["auroc"] <= 1.0
    # detached from a trainer: full precision
    seen.clear()
    model.trainer = None
    evaluate_model(model, datamodule, device=torch.device("cpu"), max_samples=40)
    assert seen == [(False, torch.float32)] * 4


def test_tuning_sets_scores_through_the_public_api(datamodule: OODDataModule, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine never writes the method's score state itself: it calls ``configure_scores``."""
    torch.manual_seed(0)
    model = Classifier(num_classes=10, backbone="cifar_resnet20", backbone_weights=WEIGHTS, scores=["msp", "knn"],
                       score_kwargs={"knn": {"k": 7}}).eval()
    calls: list[dict] = []
    monkeypatch.setattr(model, "configure_scores", lambda **kwargs: calls.append(kwargs), raising=False)
    reference = engine.collect_outputs(model, datamodule, datamodule.reference_dataset(), torch.device("cpu"))
    tuned = engine.tune_on_ood_val(model, datamodule, torch.device("cpu"), reference)
    assert model.score_kwargs == {"knn": {"k": 7}}  # untouched by the engine
    (call,) = calls
    assert set(call) == {"score_kwargs"} and call["score_kwargs"]["knn"] == tuned["knn"]["hyperparameters"]
