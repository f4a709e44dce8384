"""WiSE-FT / BANG / soups end to end: real ResNet-20 fine-tuned on the bundled CIFAR-10 subset through the
real CLI (``fit``, ``average``, ``evaluate``), plus the ``WeightAveraging`` callback. CPU, offline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from robustft.averaging import (
    StateDictMismatchError,
    greedy_soup,
    interpolate_state_dicts,
    load_state_dict_file,
    uniform_soup,
)
from robustft.cli import main
from robustft.evaluation.engine import collect_outputs
from robustft.evaluation.sweep import _choose, _resolve_alphas
from robustft.evaluation.weight_space import (
    SweepSettings,
    build_model_at_alpha,
    fit_temperature,
    load_endpoint,
    model_state,
    run_sweep,
)
from robustft.methods import ConfigMismatchError, Finetune

pytestmark = pytest.mark.slow  # session CLIP pre-training / several fits: see README (Tests)

REPO = Path(__file__).resolve().parents[1]
CONFIG = "tests/conf/tiny_finetune.yaml"
PNG = "data/cifar10/cifar10_kaggle_train200_png.npz"
CHECKPOINT_CALLBACK = "{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true, save_top_k: 0}}"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # configs use repo-relative data paths


def _fit(out: Path, *extra: str) -> Path:
    main(["fit", "--config", CONFIG, "--trainer.logger.init_args.save_dir", str(out), *extra])
    return out / "tb" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three real fits shared by the module: plain fine-tuning, BANG (Mixup + LS, with the WeightAveraging
    callback) and a randomly initialised ResNet-32 (for the mismatch check)."""
    root = tmp_path_factory.mktemp("runs")
    callback = (
        "{class_path: robustft.callbacks.WeightAveraging, init_args: {alphas: [0], corruptions: [contrast], "
        f"severities: [3], save_alpha: 0.5, report_dir: '{root / 'bang_average'}'}}}}"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        plain = _fit(root / "plain")
        bang = _fit(
            root / "bang", "--model.init_args.mixup_alpha", "0.5", "--model.init_args.label_smoothing", "0.1",
            "--trainer.callbacks", f"[{CHECKPOINT_CALLBACK}, {callback}]",
        )
        r32 = _fit(
            root / "r32", "--model.init_args.backbone", "cifar_resnet32", "--model.init_args.backbone_weights", "null",
            "--trainer.limit_train_batches", "2",
        )
    return {"root": root, "plain": plain, "bang": bang, "r32": r32, "bang_average": root / "bang_average"}


@pytest.fixture(scope="module")
def configured(runs):
    """The model and data exactly as ``average`` gets them from the config (seeded, not yet changed)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        cli = main(["--config", CONFIG, "--trainer.logger.init_args.save_dir", str(runs["root"] / "cfg")], run=False)
        assert cli.datamodule.preprocess == cli.model.preprocess  # passed in by the CLI
        cli.datamodule.setup("test")
    return cli.model.eval(), cli.datamodule


def _batch(datamodule) -> dict[str, torch.Tensor]:
    return next(iter(datamodule.eval_loader(datamodule.test_dataset())))


def test_endpoints_reproduce_initial_and_finetuned_logits_exactly(runs, configured) -> None:
    model, datamodule = configured
    theta0 = model_state(model)  # θ0 = the configured (pre-trained) model, as `average` takes it
    theta1 = load_endpoint(runs["plain"], model, "--finetuned_ckpt")
    images = _batch(datamodule)["image"][:16]
    initial = Finetune(**{k: v for k, v in model.hparams.items() if not k.startswith("_")}).eval()
    finetuned = Finetune.load_from_checkpoint(runs["plain"], map_location="cpu").eval()
    with torch.no_grad():
        expected0, expected1 = initial(images), finetuned(images)
        build_model_at_alpha(model, theta0, theta1, 0.0)
        assert torch.equal(model(images), expected0)
        build_model_at_alpha(model, theta0, theta1, 1.0)
        assert torch.equal(model(images), expected1)
        assert not torch.equal(expected0, expected1)
        build_model_at_alpha(model, theta0, theta1, 0.5)
        mid = model(images)
    assert not torch.equal(mid, expected0) and not torch.equal(mid, expected1)
    model.load_state_dict(theta0)


def test_uniform_soup_of_identical_checkpoints_is_the_checkpoint(runs) -> None:
    theta = load_state_dict_file(runs["plain"])
    soup = uniform_soup([load_state_dict_file(runs["plain"]) for _ in range(3)])
    assert soup.keys() == theta.keys()
    assert all(torch.equal(soup[k], theta[k]) and soup[k].dtype == theta[k].dtype for k in theta)


def test_greedy_soup_is_never_below_its_best_ingredient(runs, configured) -> None:
    model, datamodule = configured
    theta0 = model_state(model)
    ingredients = [theta0, load_state_dict_file(runs["plain"]), load_state_dict_file(runs["bang"])]
    held_out = datamodule.val_dataset()  # carved off the training set, never trained on

    def accuracy(state: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(state)
        out = collect_outputs(model, datamodule, held_out, torch.device("cpu"))
        labels = out["labels"] if "labels" in out else out["label"]
        return float((out["logits"].argmax(1) == labels).double().mean())

    result = greedy_soup(ingredients, accuracy)
    assert result.soup_score >= max(result.scores)
    assert result.selected_indices[0] == max(range(3), key=lambda i: (result.scores[i], -i))
    assert accuracy(result.state_dict) == result.soup_score
    model.load_state_dict(theta0)


def test_mismatched_checkpoints_are_refused_with_the_keys_named(runs, tmp_path) -> None:
    r20, r32 = load_state_dict_file(runs["plain"]), load_state_dict_file(runs["r32"])
    with pytest.raises(StateDictMismatchError, match=r"backbone\.layer1\.3\.conv1\.weight"):
        interpolate_state_dicts(r20, r32, 0.5)
    # through the subcommand: refused before any data is loaded, offending keys in the message
    with pytest.raises(StateDictMismatchError, match=r"unexpected key\(s\) in theta1: backbone\.layer1\.3"):
        main(["average", "--config", CONFIG, "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--finetuned_ckpt", str(runs["r32"]), "--report_dir", str(tmp_path / "rep")])
    assert not (tmp_path / "rep" / "average.json").exists()


def test_checkpoint_of_another_method_is_refused(configured, tmp_path) -> None:
    model, _ = configured
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": model.state_dict(), "robustft": {"method": "robustft.methods.classifier.Classifier"}}, path)
    with pytest.raises(ConfigMismatchError, match="robustft.methods.classifier.Classifier"):
        load_endpoint(path, model, "--finetuned_ckpt")


def test_average_cli_end_to_end_and_evaluate_loads_the_chosen_model(runs, tmp_path) -> None:
    rep = tmp_path / "average"
    main([
        "average", "--config", CONFIG, "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--finetuned_ckpt", str(runs["plain"]), "--alphas", "[0, 1]", "--corruptions", "[gaussian_noise]",
        "--severities", "[3]", "--shifted_sets", f"{{png_lossless: {{source: npz, path: {PNG}, max_samples: 40}}}}",
        "--save_alpha", "0.5", "--report_dir", str(rep),
    ])
    files = {p.name for p in rep.iterdir()}
    assert {"average.json", "average.csv", "average.md", "average.png"} <= files
    payload = json.loads((rep / "average.json").read_text())
    rows = payload["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]  # save_alpha 0.5 joins the grid
    for row in rows:
        assert {"id_acc", "val_acc", "val_msp", "shift/gaussian_noise-3", "shift/png_lossless",
                "shift_mean", "auroc/near", "auroc/far", "auroc/tin", "auroc/dtd"} <= set(row)
        assert row["shift/gaussian_noise-3"] < row["id_acc"]  # the corruption is a real shift
    chosen = payload["meta"]["chosen_alpha"]
    assert chosen == 0.5
    csv_header = (rep / "average.csv").read_text().splitlines()[0].split(",")
    assert csv_header[:2] == ["alpha", "id_acc"] and len((rep / "average.csv").read_text().splitlines()) == 4
    assert "| α | ID acc |" in (rep / "average.md").read_text()
    with Image.open(rep / "average.png") as png:
        assert png.format == "PNG" and png.size[0] > 300
    # the chosen α is an ordinary checkpoint: `evaluate` loads it and reproduces its row of the table
    ckpt = rep / f"averaged_alpha{chosen:.2f}.ckpt"
    assert ckpt.is_file() and payload["meta"]["checkpoint"] == str(ckpt)
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert stored["robustft"]["averaging"]["alpha"] == chosen and "optimizer_states" not in stored
    main(["evaluate", "--config", CONFIG, "--trainer.logger.init_args.save_dir", str(tmp_path),
          "--ckpt_path", str(ckpt), "--report_dir", str(tmp_path / "eval")])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    row = next(r for r in rows if r["alpha"] == chosen)
    assert report["id"]["acc"] == pytest.approx(row["id_acc"], abs=1e-9)
    assert report["ood"]["tin"]["msp"]["auroc"] == pytest.approx(row["auroc/tin"], abs=1e-9)
    # the α = 0 row is the pre-trained model: the callback's sweep of the BANG run has the same row
    callback_rows = json.loads((runs["bang_average"] / "average.json").read_text())["rows"]
    assert callback_rows[0]["alpha"] == 0.0
    assert callback_rows[0]["id_acc"] == pytest.approx(rows[0]["id_acc"], abs=1e-9)
    assert callback_rows[0]["auroc/far"] == pytest.approx(rows[0]["auroc/far"], abs=1e-9)


def test_weight_averaging_callback_writes_the_sweep_and_the_chosen_model(runs) -> None:
    directory = runs["bang_average"]
    payload = json.loads((directory / "average.json").read_text())
    assert [r["alpha"] for r in payload["rows"]] == [0.0, 0.5]  # save_alpha 0.5 joins the grid
    assert "shift/contrast-3" in payload["rows"][0]
    assert payload["meta"]["theta0"] == "weights at the start of fit"
    ckpt = directory / "averaged_alpha0.50.ckpt"
    assert ckpt.is_file() and (directory / "average.png").is_file()
    # the module keeps the fine-tuned weights (last.ckpt), the saved model is the α = 0.5 average
    theta1 = load_state_dict_file(runs["bang"])
    averaged = load_state_dict_file(ckpt)
    assert averaged.keys() == theta1.keys()
    assert not torch.equal(averaged["head.weight"], theta1["head.weight"])


def test_bang_head_temperature_is_fitted_on_id_validation(runs, configured) -> None:
    """BANG-scale: T minimises θ1's validation NLL; θ1's head divided by T divides its logits by T."""
    model, datamodule = configured
    theta0 = model_state(model)
    theta1 = load_endpoint(runs["plain"], model, "--finetuned_ckpt")
    settings = SweepSettings(alphas=[1.0], head_temperature="nll")
    result = run_sweep(model, datamodule, theta0, theta1, settings, torch.device("cpu"))
    t = result.meta["head_temperature"]
    assert result.meta["head_temperature_rule"] == "nll" and 0.05 < t < 20 and t != 1.0
    plain = run_sweep(model, datamodule, theta0, theta1, SweepSettings(alphas=[1.0]), torch.device("cpu"))
    scaled_row, plain_row = result.rows[0], plain.rows[0]
    assert scaled_row["val_logit_norm"] == pytest.approx(plain_row["val_logit_norm"] / t, rel=1e-5)
    assert scaled_row["val_acc"] == plain_row["val_acc"] and scaled_row["id_acc"] == plain_row["id_acc"]
    assert scaled_row["val_nll"] <= plain_row["val_nll"] + 1e-9
    model.load_state_dict(theta0)


def test_shifted_set_of_a_class_subset_is_scored_on_its_classes_only(runs, configured, tmp_path) -> None:
    """An ImageNet-R-like set (3 of the 10 ID classes, own label ids 0..2, matched by name) is scored with
    the argmax restricted to its classes (WiSE-FT's 200-class projection) or, on request, over all 10."""
    import numpy as np

    from robustft.data.shifts import shifted_test_sets

    model, datamodule = configured
    with np.load(REPO / PNG) as png:
        images, labels, names = png["images"], png["labels"], [str(n) for n in png["class_names"]]
    subset = ["ship", "cat", "dog"]  # reordered on purpose
    columns = [names.index(n) for n in subset]
    keep = np.isin(labels, columns)
    own = np.asarray([columns.index(int(y)) for y in labels[keep]])
    np.savez(tmp_path / "subset.npz", images=images[keep], labels=own, class_names=np.asarray(subset))
    spec = {"sub": {"source": "npz", "path": str(tmp_path / "subset.npz")}}
    sets = shifted_test_sets(datamodule, [], [3], spec)
    assert sets["sub"].class_indices == columns and len(sets["sub"]) == int(keep.sum())

    theta0 = model_state(model)
    rows = {}
    for mode in ("subset", "full"):
        settings = SweepSettings(alphas=[0.0], shifted=sets, shifted_projection=mode)
        rows[mode] = run_sweep(model, datamodule, theta0, theta0, settings, torch.device("cpu")).rows[0]["shift/sub"]
    # the independent computation on the same images
    logits = collect_outputs(model, datamodule, sets["sub"], torch.device("cpu"))["logits"]
    own_t = torch.as_tensor(own)
    expected_subset = float((logits[:, columns].argmax(1) == own_t).double().mean())
    expected_full = float((logits.argmax(1) == torch.as_tensor(columns)[own_t]).double().mean())
    assert rows["subset"] == pytest.approx(expected_subset, abs=1e-12)
    assert rows["full"] == pytest.approx(expected_full, abs=1e-12)
    assert rows["subset"] >= rows["full"] and rows["subset"] > 0.5  # real ResNet-20 on real images
    model.load_state_dict(theta0)


def test_fit_temperature_recovers_the_temperature_of_the_labels() -> None:
    generator = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(4000, 10, generator=generator)
    labels = torch.multinomial((z / 2.5).softmax(1), 1, generator=generator).squeeze(1)
    assert fit_temperature(z, labels) == pytest.approx(2.5, rel=0.1)


def test_alpha_grid_and_selection_rules_are_checked() -> None:
    rows = [{"alpha": 0.0, "val_acc": 0.8, "shift_mean": 0.5}, {"alpha": 0.5, "val_acc": 0.9, "shift_mean": 0.6},
            {"alpha": 1.0, "val_acc": 0.9, "shift_mean": 0.7}]
    assert _choose(rows, "best_val") == 0.5  # ties go to the smaller α
    assert _choose(rows, "best_shifted") == 1.0
    assert _choose(rows, 0.25) == 0.25 and _choose(rows, None) is None
    with pytest.raises(ValueError, match="shifted sets"):
        _choose([{"alpha": 0.0, "val_acc": 0.8}], "best_shifted")
    assert _resolve_alphas([0, 1], 0.3) == [0.0, 0.3, 1.0]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _resolve_alphas([0, 1.5], None)
    with pytest.raises(ValueError, match="best_shifted"):
        _resolve_alphas([0, 1], "best_test")
    assert math.isclose(sum(_resolve_alphas([0.0, 0.5, 1.0], None)), 1.5)


def test_evaluate_without_a_model_section_passes_the_models_preprocessing(runs, tmp_path) -> None:
    """The datamodule never reaches into the model: the CLI passes ``model.preprocess`` in, also when the
    model comes from the checkpoint alone (``evaluate --ckpt_path`` with no model section)."""
    import yaml

    config = yaml.safe_load((REPO / CONFIG).read_text())
    del config["model"]
    path = tmp_path / "data_only.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["evaluate", "--config", str(path), "--trainer.logger.init_args.save_dir", str(tmp_path),
                "--ckpt_path", str(runs["plain"]), "--report_dir", str(tmp_path / "eval")])
    assert isinstance(cli.model, Finetune)
    assert cli.datamodule.preprocess is not None and cli.datamodule.preprocess == cli.model.preprocess
    assert (tmp_path / "eval" / "report.json").is_file()


def test_average_checkpoints_gives_a_bare_datamodule_the_models_preprocessing(runs, configured, tmp_path) -> None:
    """A Python caller's datamodule without ``preprocess`` is configured through the public
    ``set_preprocess``; one with its own preprocessing keeps it."""
    from robustft.backbones.base import PreprocessConfig
    from robustft.data import OODDataModule
    from robustft.evaluation.weight_space import average_checkpoints

    model, configured_dm = configured
    theta0 = model_state(model)
    kwargs = {key: configured_dm.specs[key] for key in ("train", "test")}
    bare = OODDataModule(**kwargs, ood=configured_dm.ood_specs, val_fraction=0.25)
    odd = PreprocessConfig(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert model.preprocess != odd and bare.preprocess is None
    own = OODDataModule(**kwargs, ood=configured_dm.ood_specs, val_fraction=0.25, preprocess=odd)
    for datamodule, expected in ((bare, model.preprocess), (own, odd)):
        average_checkpoints(model, datamodule, runs["plain"], alphas=[1.0], corruptions=[],
                            report_dir=tmp_path / str(id(datamodule)))
        assert datamodule.preprocess == expected and datamodule.resolve_preprocess() == expected
    model.load_state_dict(theta0)
