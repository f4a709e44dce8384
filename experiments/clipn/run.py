"""CLIPN vs zero-shot MCM on the micro CLIP pre-trained on the bundled CIFAR-10 (offline, CPU).

    OMP_NUM_THREADS=1 python experiments/clipn/run.py --seeds 0 1 --epochs 3 [--no_pairs other_class|all] [--variant learnable|handcrafted]

1. Pre-trains the micro CLIP once with tests/conf/clip_micro_pretrain.yaml (the test suite's session fixture:
   6 epochs of the CLIP loss on 2,500 CIFAR-10 train images) -> runs/clipn/micro_clip/open_clip_weights.pt.
2. Per seed: `fit` of configs/clipn/cifar10_tiny_offline.yaml with the micro CLIP and its one template, then
   `evaluate` of last.ckpt on the full bundled ID test set (2,000) and OOD sets (TIN 1,530, MNIST 10,000,
   DTD 600). The report's MCM / MSP / ... rows are on the unchanged yes logits, i.e. zero-shot CLIP (the
   test suite checks they equal ZeroShotCLIP's report exactly).
3. The threshold-free decisions of both rules (fraction of each set called OOD) from the same outputs.

Writes runs/clipn/<tag>/seed<s>/{report,decisions}.json and prints one table row per seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from robustft.cli import main
from robustft.evaluation.engine import collect_outputs
from robustft.ood.clipn_scores import atd_decision, ctw_decision

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "runs" / "clipn"
WEIGHTS = OUT / "micro_clip" / "open_clip_weights.pt"


def pretrain() -> None:
    if not WEIGHTS.is_file():
        main(["fit", "--config", "tests/conf/clip_micro_pretrain.yaml", "--trainer.default_root_dir", str(WEIGHTS.parent)])


def config(seed: int, epochs: int, no_pairs: str, lr: float, variant: str, root: Path) -> Path:
    cfg = yaml.safe_load((REPO / "configs/clipn/cifar10_tiny_offline.yaml").read_text())
    cfg["seed_everything"] = seed
    cfg["trainer"].update(max_epochs=epochs, default_root_dir=str(root), enable_progress_bar=False,
                          limit_val_batches=0)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(root)
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "OODEvaluation" not in c["class_path"]]
    args = cfg["model"]["init_args"]
    args.update(clip_model="robustft-micro-vit", pretrained=str(WEIGHTS), templates=["a photo of a {}."],
                no_pairs=no_pairs, variant=variant)
    if variant == "handcrafted":
        args.pop("n_prompts", None)
    args["optimizer"]["init_args"]["lr"] = lr
    cfg["data"]["init_args"].update(batch_size=64, augmentation="none")
    path = root / "config.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def decisions(cli) -> dict[str, dict[str, float]]:
    model, dm = cli.model, cli.datamodule
    dm.setup("test")
    sets = {"cifar10 (ID)": dm.test_dataset(), **dm.ood_datasets("test")}
    out = {}
    for name, dataset in sets.items():
        o = collect_outputs(model, dm, dataset, torch.device("cpu"), name)
        out[name] = {"ctw_ood": float(ctw_decision(o["logits"], o["no_logits"]).float().mean()),
                     "atd_ood": float(atd_decision(o["logits"], o["no_logits"]).float().mean())}
    return out


def run(seed: int, epochs: int, no_pairs: str, lr: float, variant: str, tag: str) -> None:
    root = OUT / tag / f"seed{seed}"
    path = config(seed, epochs, no_pairs, lr, variant, root)
    start = time.perf_counter()
    main(["fit", "--config", str(path)])
    fit_s = time.perf_counter() - start
    ckpt = root / "tb" / "checkpoints" / "last.ckpt"
    cli = main(["evaluate", "--config", str(path), "--ckpt_path", str(ckpt), "--report_dir", str(root / "report")])
    dec = decisions(cli)
    (root / "decisions.json").write_text(json.dumps({"fit_seconds": fit_s, "decisions": dec}, indent=2))
    report = json.loads((root / "report" / "report.json").read_text())
    row = {s: {k: round(report["ood"][n][s][m], 4) for n in ("tin", "mnist", "dtd") for m in ("auroc", "fpr95")
               for k in [f"{n}_{m}"]} for s in ("atd", "ctw", "mcm")}
    print(json.dumps({"tag": tag, "seed": seed, "acc": report["id"]["acc"], "fit_s": round(fit_s), "rows": row,
                      "decisions": dec}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no_pairs", default="other_class")
    parser.add_argument("--variant", default="learnable")
    parser.add_argument("--tag", default=None)
    a = parser.parse_args()
    torch.set_num_threads(1)
    pretrain()
    for s in a.seeds:
        run(s, a.epochs, a.no_pairs, a.lr, a.variant, a.tag or f"{a.variant}_{a.no_pairs}_e{a.epochs}")
