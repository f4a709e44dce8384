"""``evaluate`` and ``test`` forward every ID and OOD sample exactly once (issue 18).

Lightning's test loop forwards the ID test set (it logs ``test/acc``) and the OOD evaluation runs at the
end of that epoch. Before the fix the engine forwarded the ID test set a second time; now it reuses the
test loop's outputs (``robustft.evaluation.engine.CaptureTestOutputs``). Counted at two levels: the
sample indices passed to ``forward_eval`` (per set, so a second pass over one set shows) and the images
reaching the backbone (so a forward outside ``forward_eval`` shows too).
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from robustft.backbones.cifar_resnet import CifarResNet
from robustft.cli import main
from robustft.evaluation.engine import _CAPTURES, evaluate_model
from robustft.methods.classifier import Classifier
from robustft.ood.report import compare_reports

REPO = Path(__file__).resolve().parents[2]
#: distinct sizes, so a repeated pass over any one set changes the per-index counts
N_ID, N_TIN, N_DTD = 45, 31, 23


def _config(tmp_path: Path, report_dir: Path) -> Path:
    def npz(path: str, n: int) -> dict:
        return {"source": "npz", "path": str(REPO / path), "max_samples": n}

    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"),
            "callbacks": [{"class_path": "robustft.callbacks.OODEvaluation",
                           "init_args": {"every_n_epochs": 0, "plots": False, "report_dir": str(report_dir)}}],
        },
        "model": {
            "class_path": "robustft.methods.Classifier",
            "init_args": {"num_classes": 10, "backbone": "cifar_resnet20",
                          "backbone_weights": str(REPO / "data/weights/resnet20-12fca82f.th"),
                          "scores": ["msp", "energy"]},  # no score needs the training set
        },
        "data": {
            "class_path": "robustft.data.OODDataModule",
            "init_args": {
                "train": npz("data/cifar10/cifar10_test_2k.npz", 20),
                "test": npz("data/cifar10/cifar10_test_2k.npz", N_ID),
                "ood": {"near": {"tin": npz("data/tinyimagenet/tin_test_32.npz", N_TIN)},
                        "far": {"dtd": npz("data/dtd/dtd_10class_32.npz", N_DTD)}},
                "eval_batch_size": 16,  # several uneven batches per set
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("subcommand", ["evaluate", "test"])
def test_every_id_and_ood_sample_is_forwarded_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, subcommand: str
) -> None:
    indices: list[int] = []
    backbone_images = [0]
    forward_eval, backbone_forward = Classifier.forward_eval, CifarResNet.forward

    def counting_forward_eval(self: Classifier, batch: dict) -> dict:
        indices.extend(batch["index"].tolist())
        return forward_eval(self, batch)

    def counting_backbone(self: CifarResNet, images: torch.Tensor) -> torch.Tensor:
        backbone_images[0] += images.shape[0]
        return backbone_forward(self, images)

    monkeypatch.setattr(Classifier, "forward_eval", counting_forward_eval)
    monkeypatch.setattr(CifarResNet, "forward", counting_backbone)
    report_dir = tmp_path / "report"
    args = [subcommand, "--config", str(_config(tmp_path, report_dir))]
    if subcommand == "evaluate":
        args += ["--report_dir", str(report_dir)]
    with contextlib.redirect_stdout(io.StringIO()):
        cli = main(args)

    # one forward per sample: index i of each set seen once per set that has an i
    expected = Counter(range(N_ID)) + Counter(range(N_TIN)) + Counter(range(N_DTD))
    assert Counter(indices) == expected
    assert backbone_images[0] == N_ID + N_TIN + N_DTD
    # the capture is gone after the test loop: the class's forward_eval is back
    assert "forward_eval" not in cli.model.__dict__ and cli.model not in _CAPTURES

    report = yaml.safe_load((report_dir / "report.json").read_text())
    assert report["id"]["n"] == N_ID and report["ood"]["tin"]["msp"]["n"] == N_TIN
    # test/acc (Lightning's test loop) and id.acc (the report) come from the same logits; Lightning's
    # batch-weighted float32 mean differs from correct / n by rounding only
    test_acc = float(cli.trainer.callback_metrics["test/acc"])
    assert test_acc == pytest.approx(report["id"]["acc"], abs=1e-6)
    assert round(test_acc * N_ID) == round(report["id"]["acc"] * N_ID)

    # and the reused outputs give exactly the report a fresh, separate pass gives
    indices.clear()
    fresh = evaluate_model(cli.model, cli.datamodule, device=torch.device("cpu")).report
    assert Counter(indices) == expected  # outside a test loop the engine forwards the ID set itself
    assert compare_reports(report, fresh, atol=1e-6) == []


class _RefitClassifier(Classifier):
    """A method whose outputs change once ``fit_reference`` ran (as PALM's probe logits do)."""

    def fit_reference(self, reference_outputs: dict | None) -> None:
        self.refitted = True
        super().fit_reference(reference_outputs)

    def forward_eval(self, batch: dict) -> dict:
        outputs = super().forward_eval(batch)
        return {**outputs, "logits": -outputs["logits"]} if getattr(self, "refitted", False) else outputs


def test_a_method_that_refits_is_forwarded_again_after_the_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test loop runs before ``fit_reference``; its outputs are stale for such a method, so the engine
    forwards the ID test set itself, after the fit (the report's accuracy is the refitted model's)."""
    import lightning.pytorch as pl

    from robustft.callbacks import OODEvaluation
    from robustft.data import DatasetSpec, OODDataModule
    from robustft.evaluation.engine import CaptureTestOutputs

    def spec(path: str, n: int) -> DatasetSpec:
        return DatasetSpec(source="npz", path=str(REPO / path), max_samples=n)

    datamodule = OODDataModule(
        train=spec("data/cifar10/cifar10_test_2k.npz", 20), test=spec("data/cifar10/cifar10_test_2k.npz", N_ID),
        ood={"far": {"dtd": spec("data/dtd/dtd_10class_32.npz", N_DTD)}}, eval_batch_size=16,
    )
    model = _RefitClassifier(num_classes=10, backbone="cifar_resnet20",
                             backbone_weights=str(REPO / "data/weights/resnet20-12fca82f.th"), scores=["msp"])
    indices: list[int] = []
    forward_eval = _RefitClassifier.forward_eval

    def counting(self: _RefitClassifier, batch: dict) -> dict:
        indices.extend(batch["index"].tolist())
        return forward_eval(self, batch)

    monkeypatch.setattr(_RefitClassifier, "forward_eval", counting)
    evaluation = OODEvaluation(every_n_epochs=0, plots=False, report_dir=str(tmp_path / "report"))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[CaptureTestOutputs(), evaluation])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.test(model, datamodule=datamodule, verbose=False)
    assert Counter(indices) == Counter([*range(N_ID), *range(N_ID), *range(N_DTD)])  # ID: test loop + after the fit
    negated_acc = evaluation.last_result.report["id"]["acc"]
    assert negated_acc < 0.2 < float(trainer.callback_metrics["test/acc"])  # -logits: argmin class, mostly wrong
