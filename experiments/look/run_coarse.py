"""Coarse-label pre-training study: LOOK vs SupCon-style vs cross-entropy, then a fine-class linear probe.

For each method and seed: ``python -m robustft fit`` of ``configs/look/cifar10_coarse_<method>_offline.yaml``
(ResNet-20 from scratch, bundled 5k CIFAR-10, 2 superclasses via ``data.label_map``), whose
``ExportBackbone`` callback writes ``backbone.pt``. Then, with that backbone frozen (eval mode), features
of the 5k training images and of the 2k test images (evaluation transform, FINE labels) are extracted
once and a multinomial logistic regression on the 10 fine classes is fitted (full-batch L-BFGS on
standardised features, L2 ``--probe_wd``) -- a feature-cached linear probe, so six probes cost seconds,
not six CLI probe runs. Also reported: a 20-NN (cosine) fine-class accuracy and the coarse (2-way) accuracy
of the same probe's predictions mapped to superclasses.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/look/run_coarse.py --epochs 2 --seeds 0 1

Runs are skipped when their ``backbone.pt`` exists (re-running resumes the study). Results go to
``experiments/look/results.json`` (one entry per run, written as each finishes) and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
METHODS = ("look", "supcon", "ce")
#: reference rows: ``random`` = the same ResNet-20 at its random initialisation (no pre-training at all)
EXTRA = ("random",)
VEHICLES = (0, 1, 8, 9)  # airplane, automobile, ship, truck


def pretrain(method: str, seed: int, epochs: int, root: Path) -> tuple[Path, float]:
    out = root / f"{method}_s{seed}"
    weights = out / "backbone.pt"
    if weights.is_file():
        return weights, float("nan")
    if method == "random":
        from robustft.backbones import create_backbone

        torch.manual_seed(seed)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(create_backbone("cifar_resnet20").state_dict(), weights)
        return weights, 0.0
    cmd = [
        sys.executable, "-m", "robustft", "fit", "--config", f"configs/look/cifar10_coarse_{method}_offline.yaml",
        "--seed_everything", str(seed), "--trainer.max_epochs", str(epochs),
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.enable_progress_bar", "false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return weights, time.perf_counter() - start


@torch.no_grad()
def extract(weights: Path) -> dict[str, torch.Tensor]:
    from robustft.backbones import create_backbone
    from robustft.data import OODDataModule

    data = OODDataModule(
        train={"source": "npz", "path": str(REPO / "data/cifar10/cifar10_train_5k_jpeg.npz")},
        test={"source": "npz", "path": str(REPO / "data/cifar10/cifar10_test_2k.npz")},
        val_fraction=0.0, eval_batch_size=500, eval_cache_mb=0,
    )
    data.setup("fit")
    backbone = create_backbone("cifar_resnet20", weights=str(weights)).eval()
    out = {}
    for split, dataset in (("train", data.reference_dataset()), ("test", data.test_dataset())):
        feats, labels = [], []
        for batch in data.eval_loader(dataset):
            feats.append(backbone(batch["image"]).float())
            labels.append(batch["label"])
        out[f"{split}_x"], out[f"{split}_y"] = torch.cat(feats), torch.cat(labels)
    return out


def linear_probe(f: dict[str, torch.Tensor], wd: float, iters: int = 300) -> torch.Tensor:
    """Test predictions of an L2-regularised multinomial logistic regression on standardised features."""
    mean, std = f["train_x"].mean(0), f["train_x"].std(0) + 1e-6
    x, xt = (f["train_x"] - mean) / std, (f["test_x"] - mean) / std
    w = torch.zeros(x.shape[1], 10, requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, f["train_y"]) + wd * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (xt @ w + b).argmax(1)


@torch.no_grad()
def knn_predict(f: dict[str, torch.Tensor], k: int = 20) -> torch.Tensor:
    bank, queries = F.normalize(f["train_x"], dim=1), F.normalize(f["test_x"], dim=1)
    idx = (queries @ bank.T).topk(k, dim=1).indices
    votes = F.one_hot(f["train_y"][idx], 10).sum(1)
    return votes.argmax(1)


def coarse(y: torch.Tensor) -> torch.Tensor:
    return torch.isin(y, torch.tensor(VEHICLES)).long()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + EXTRA)
    parser.add_argument("--probe_wd", type=float, default=1e-4)
    parser.add_argument("--root", type=Path, default=REPO / "runs/look/coarse_study")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results_path = HERE / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for seed in args.seeds:
        for method in args.methods:
            key = f"{method}_s{seed}"
            weights, seconds = pretrain(method, seed, args.epochs, args.root)
            start = time.perf_counter()
            feats = extract(weights)
            pred = linear_probe(feats, args.probe_wd)
            y = feats["test_y"]
            entry = {
                "method": method, "seed": seed, "epochs": args.epochs,
                "fine_probe_acc": float((pred == y).float().mean()),
                "fine_knn20_acc": float((knn_predict(feats) == y).float().mean()),
                "coarse_acc_of_fine_probe": float((coarse(pred) == coarse(y)).float().mean()),
                "pretrain_seconds": seconds if seconds == seconds else results.get(key, {}).get("pretrain_seconds"),
                "probe_seconds": time.perf_counter() - start,
            }
            results[key] = entry
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            print(json.dumps(entry), flush=True)
    write_table(results, HERE / "results.md")


def write_table(results: dict, path: Path) -> None:
    rows = ["| pre-training (coarse labels) | seeds | fine linear probe acc | fine 20-NN acc | coarse acc of probe | pre-train s/run |",
            "|---|---|---|---|---|---|"]
    for method in METHODS + EXTRA:
        runs = [r for r in results.values() if r["method"] == method]
        if not runs:
            continue

        def cell(key: str, runs: list[dict] = runs) -> str:
            vals = [100 * r[key] for r in runs]
            spread = f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else ""
            return f"{statistics.mean(vals):.1f}{spread} ({', '.join(f'{v:.1f}' for v in vals)})"

        secs = [r["pretrain_seconds"] for r in runs if r.get("pretrain_seconds") is not None]
        rows.append(f"| {method} | {','.join(str(r['seed']) for r in runs)} | {cell('fine_probe_acc')} | "
                    f"{cell('fine_knn20_acc')} | {cell('coarse_acc_of_fine_probe')} | "
                    f"{statistics.mean(secs) if secs else float('nan'):.0f} |")
    path.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
