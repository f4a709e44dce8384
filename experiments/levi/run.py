"""LEVI vs linear probe vs full fine-tuning vs G alone on CIFAR-10 with F = the real ResNet-56, same budget.

Every run goes through the real CLI in this process (``fit``, then ``average --alphas [1.0]``, which is
exactly the fine-tuned checkpoint evaluated on the ID test set, the covariate-shifted sets and the OOD
sets by the shared engine). Writes ``results.json`` (one row per method and seed, after each run) and
``results.md`` (mean and spread over seeds).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/levi/run.py            # the README's table
    .venv/bin/python experiments/levi/run.py --weights data/weights/resnet56-4bfd9763.th --seeds 0 1 2

Same budget for every method: the same 1,000 training images (100 per class, 10% held out for
validation), the same epochs and batch size, no augmentation (so LEVI and the probe may cache F's
features; fine-tuning recomputes F every step). Each method keeps its own optimizer recipe: SGD lr 0.01
(the repository's CIFAR default) for the probe and fine-tuning, AdamW lr 1e-3 / wd 0.05 (the spec's
LEVI default) for LEVI and G alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from robustft.cli import main  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_WEIGHTS = "data/weights/resnet56-4bfd9763.th"
SHARED_WEIGHTS = "../shared/data/weights/cifar10_resnet_akamaster/resnet56-4bfd9763.th"
PRETRAINED = "pretrained_F_no_training"  # alpha = 0 of the fine-tuning run: F with its own head, as loaded
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast")
SEVERITIES = (3, 5)
SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.9, "weight_decay": 5.0e-4}}
ADAMW = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1.0e-3, "weight_decay": 0.05}}


def model_section(method: str, weights: str) -> dict[str, Any]:
    levi = {"num_classes": 10, "backbone": "cifar_resnet56", "backbone_weights": weights, "layers": [2, 3],
            "small_model": {"kind": "cnn", "widths": [16, 32, 64]}, "adapter_mode": "concat",
            "adapter_hidden": 512, "adapter_dropout": 0.1, "cache_features": True,
            "scores": ["msp", "energy"], "optimizer": ADAMW}
    classifier = {"num_classes": 10, "backbone": "cifar_resnet56", "backbone_weights": weights,
                  "scores": ["msp", "energy"], "optimizer": SGD}
    if method == "levi":
        return {"class_path": "robustft.methods.levi.LEVI", "init_args": levi}
    if method == "levi_no_g":  # ablation: the same adapter over F's two layers, G off
        return {"class_path": "robustft.methods.levi.LEVI", "init_args": {**levi, "small_model": None}}
    if method == "g_alone":
        return {"class_path": "robustft.methods.levi.LEVI", "init_args": {**levi, "layers": [], "cache_features": False}}
    if method == "linear_probe":
        return {"class_path": "robustft.methods.Classifier", "init_args": {**classifier, "freeze_backbone": True}}
    if method == "full_ft":
        return {"class_path": "robustft.methods.Classifier", "init_args": {**classifier, "freeze_backbone": False}}
    raise ValueError(method)


def config(method: str, seed: int, weights: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "seed_everything": seed,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": args.epochs, "deterministic": True,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": False, "default_root_dir": str(out),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(out / "ckpt"), "save_last": True, "save_top_k": 0}}]},
        "model": model_section(method, weights),
        "data": {"class_path": "robustft.data.OODDataModule", "init_args": {
            "train": {"source": "npz", "path": "data/cifar10/cifar10_train_5k_jpeg.npz"},
            "shots_per_class": args.shots, "shots_seed": 0, "val_fraction": 0.1,
            "test": {"source": "npz", "path": "data/cifar10/cifar10_test_2k.npz", "max_samples": args.test_samples},
            "ood": {"far": {"dtd": {"source": "npz", "path": "data/dtd/dtd_10class_32.npz", "max_samples": args.ood_samples},
                            "mnist": {"source": "mnist", "path": "data/mnist", "max_samples": args.ood_samples}}},
            "augmentation": "none", "batch_size": 64, "eval_batch_size": 250,
            "seed": seed}},  # the validation split and the training shuffle vary with the seed too
    }


def run_one(method: str, seed: int, weights: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = root / method / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run_config.yaml"  # not config.yaml: fit saves its resolved config there
    path.write_text(yaml.safe_dump(config(method, seed, weights, out, args)))
    started = time.perf_counter()
    timing = out / "fit_seconds.json"
    if not (out / "ckpt" / "last.ckpt").is_file():  # resume an interrupted study: finished fits are kept
        main(["fit", "--config", str(path)])
        timing.write_text(json.dumps(time.perf_counter() - started))
    fit_s = json.loads(timing.read_text())
    alphas = "[0.0, 1.0]" if (method == "full_ft" and seed == args.seeds[0]) else "[1.0]"
    if not (out / "average" / "average.json").is_file():
        main(["average", "--config", str(path), "--finetuned_ckpt", str(out / "ckpt" / "last.ckpt"), "--alphas", alphas,
              "--corruptions", json.dumps(list(CORRUPTIONS)), "--severities", json.dumps(list(SEVERITIES)),
              "--shifted_sets", "{png_lossless: {source: npz, path: data/cifar10/cifar10_kaggle_train200_png.npz}}",
              "--report_dir", str(out / "average")])
    rows = json.loads((out / "average" / "average.json").read_text())["rows"]
    result = []
    for row in rows:
        corr = [row[f"shift/{c}-{s}"] for c in CORRUPTIONS for s in SEVERITIES]
        result.append({
            "method": method if row["alpha"] == 1.0 else PRETRAINED, "seed": seed,
            "id_acc": row["id_acc"], "corruption_mean": math.fsum(corr) / len(corr),
            "lossless_png": row["shift/png_lossless"], "shift_mean": row["shift_mean"],
            "far_auroc_msp": row["auroc/far"], "val_acc": row.get("val_acc"),
            **{k: v for k, v in row.items() if k.startswith(("shift/", "auroc/"))},
            "fit_seconds": round(fit_s, 1), "total_seconds": round(time.perf_counter() - started, 1),
        })
    return {"rows": result}


def table(rows: list[dict[str, Any]]) -> str:
    keys = ("id_acc", "corruption_mean", "lossless_png", "shift_mean", "far_auroc_msp")
    head = "| method | seeds | ID acc | corruption mean (sev 3, 5) | lossless 200 | all shifts mean | far-OOD AUROC (MSP) | fit s |"
    lines = [head, "|" + "---|" * 8]
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        cells = []
        for key in keys:
            values = [100 * r[key] for r in group]
            mean = sum(values) / len(values)
            spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
            cells.append(f"{mean:.2f} ± {spread:.2f}" if len(values) > 1 else f"{mean:.2f}")
        fit = "no training" if method == PRETRAINED else f"{sum(r['fit_seconds'] for r in group) / len(group):.0f}"
        lines.append(f"| {method} | {','.join(str(r['seed']) for r in group)} | " + " | ".join(cells) + f" | {fit} |")
    return "\n".join(lines) + "\n\n(± = half the range over seeds)\n"


def per_set_table(rows: list[dict[str, Any]]) -> str:
    """Mean over seeds of every shifted set's accuracy and every OOD set's AUROC (MSP)."""
    keys = [k for k in rows[0] if k.startswith(("shift/", "auroc/"))]
    lines = ["| method | " + " | ".join(k.replace("shift/", "").replace("auroc/", "AUROC ") for k in keys) + " |",
             "|" + "---|" * (len(keys) + 1)]
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        lines.append(f"| {method} | " + " | ".join(f"{100 * sum(r[k] for r in group) / len(group):.1f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict[str, Any]]) -> None:
    (HERE / "results.md").write_text(table(rows) + "\nPer set (mean over seeds, %):\n\n" + per_set_table(rows))


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help=f"ResNet-56 weights (default {DEFAULT_WEIGHTS}, else {SHARED_WEIGHTS})")
    parser.add_argument("--methods", nargs="+", default=["levi", "linear_probe", "full_ft", "g_alone"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--shots", type=int, default=100, help="training images per class (before the 10%% validation split)")
    parser.add_argument("--test_samples", type=int, default=500, help="ID test images (the corruptions are of these)")
    parser.add_argument("--ood_samples", type=int, default=300)
    parser.add_argument("--out", default="runs/levi_experiment")
    parser.add_argument("--tables_only", action="store_true", help="rewrite results.md from results.json and stop")
    parser.add_argument("--merge", action="store_true", help="keep the other rows of an existing results.json")
    args = parser.parse_args()
    weights = args.weights or (DEFAULT_WEIGHTS if (REPO / DEFAULT_WEIGHTS).is_file() else SHARED_WEIGHTS)
    torch.set_num_threads(1)
    import os

    os.chdir(REPO)
    root = Path(args.out)
    results = HERE / "results.json"
    if args.tables_only:
        write_tables(json.loads(results.read_text())["rows"])
        return
    rows: list[dict[str, Any]] = json.loads(results.read_text())["rows"] if results.is_file() and args.merge else []
    started = time.perf_counter()
    for seed in args.seeds:
        for method in args.methods:
            new = run_one(method, seed, weights, root, args)["rows"]
            replaced = {(r["method"], r["seed"]) for r in new}
            rows = [r for r in rows if (r["method"], r["seed"]) not in replaced] + new
            info = {"args": vars(args), "weights": weights, "wall_seconds": round(time.perf_counter() - started, 1),
                    "torch_threads": torch.get_num_threads(), "rows": rows}
            results.write_text(json.dumps(info, indent=2) + "\n")
            write_tables(rows)
            print(table(rows), flush=True)


if __name__ == "__main__":
    main_cli()
