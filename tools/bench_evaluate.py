"""``evaluate`` against a bare ``torch.no_grad()`` loop: same model, images, batch size and threads.

Why: the framework's evaluation (CLI parsing, checkpoint-free model build, datamodule, Lightning's test
loop, the OOD engine, metrics, report files) should cost little more than forwarding the images once.
The bare loop is what a user would write by hand: read the same npz arrays, normalise them as the
model's preprocessing says, build the same backbone with the same weights, and forward every ID and
OOD image once in batches under ``torch.no_grad()``. The ratio printed is
``bare seconds / evaluate seconds`` (= evaluate's throughput as a fraction of the bare loop's; the
issue's goal is >= 0.90). Both are timed end to end in this one process, after a warm-up, alternating,
best of ``--repeats`` each (the least noisy estimate on a shared machine). Figures are off in the
evaluate config (the bare loop draws none either).

    python tools/bench_evaluate.py [--depth 56 --weights ../shared/data/weights/cifar10_resnet_akamaster/resnet56-4bfd9763.th]
                                   [--test ../shared/data/cifar10/cifar10_test_jpeg.npz] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from robustft.backbones import create_backbone
from robustft.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
OOD_SETS = {"tin": "data/tinyimagenet/tin_test_32.npz", "dtd": "data/dtd/dtd_10class_32.npz"}


def evaluate_config(args: argparse.Namespace, root: Path) -> dict:
    ood = {"near": {"tin": {"source": "npz", "path": OOD_SETS["tin"]}},
           "far": {"dtd": {"source": "npz", "path": OOD_SETS["dtd"]}}}
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(root),
            "callbacks": [{"class_path": "robustft.callbacks.OODEvaluation",
                           "init_args": {"every_n_epochs": 0, "plots": False}}],
        },
        "model": {
            "class_path": "robustft.methods.Classifier",
            "init_args": {"num_classes": 10, "backbone": f"cifar_resnet{args.depth}",
                          "backbone_weights": args.weights, "scores": ["msp", "energy"]},
        },
        "data": {
            "class_path": "robustft.data.OODDataModule",
            # data.train is required; the datamodule loads it at setup even for evaluate, so a small decoded
            # set keeps its decoding out of the comparison (the bare loop reads no training data)
            "init_args": {"train": {"source": "npz", "path": args.test, "max_samples": 100},
                          "test": {"source": "npz", "path": args.test}, "ood": ood,
                          "eval_batch_size": args.batch_size},
        },
    }


def run_evaluate(config_path: Path, report_dir: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # the report table
        cli_main(["evaluate", "--config", str(config_path), "--report_dir", str(report_dir)])


def bare_loop(args: argparse.Namespace) -> int:
    """What one writes by hand: arrays -> normalised tensors -> model, every image once."""
    state = _weights(args)
    model = create_backbone(f"cifar_resnet{args.depth}")
    body = {k: v for k, v in state.items() if not k.startswith("linear.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    model.eval()
    cfg = model.preprocess
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    head = torch.nn.Linear(state["linear.weight"].shape[1], state["linear.weight"].shape[0])
    head.load_state_dict({"weight": state["linear.weight"], "bias": state["linear.bias"]})
    seen = 0
    with torch.no_grad():
        for path in [args.test, *OOD_SETS.values()]:
            images = torch.from_numpy(np.load(REPO / path)["images"])
            x = ((images.permute(0, 3, 1, 2).float().div_(255) - mean) / std).contiguous()  # NCHW, as ToTensor
            for start in range(0, len(x), args.batch_size):
                logits = head(model(x[start : start + args.batch_size]))
                logits.softmax(1).amax(1)
                seen += len(logits)
    return seen


def _weights(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """akamaster's checkpoint: ``{'state_dict': {'module.<key>': ...}}``, head = ``linear.*``."""
    state = torch.load(REPO / args.weights, map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in state.get("state_dict", state).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=20, choices=(20, 32, 44, 56, 110))
    parser.add_argument("--weights", default="data/weights/resnet20-12fca82f.th")
    parser.add_argument("--test", default="data/cifar10/cifar10_test_2k.npz")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config_path = root / "evaluate.yaml"
        config_path.write_text(yaml.safe_dump(evaluate_config(args, root / "run")))
        n_images = bare_loop(args)  # warm-up: allocator, kernels, file cache
        run_evaluate(config_path, root / "warmup")
        bares, frameworks = [], []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            bare_loop(args)
            bares.append(time.perf_counter() - started)
            started = time.perf_counter()
            run_evaluate(config_path, root / f"report{repeat}")
            frameworks.append(time.perf_counter() - started)
    bare, framework = min(bares), min(frameworks)
    pair_ratios = sorted(b / f for b, f in zip(bares, frameworks, strict=True))
    print(f"ResNet-{args.depth}, {n_images} images (ID {args.test} + OOD tin, dtd), batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print(f"bare torch.no_grad loop: {bare:7.2f} s  ({n_images / bare:7.1f} images/s)")
    print(f"robustft evaluate:       {framework:7.2f} s  ({n_images / framework:7.1f} images/s)")
    print(f"per back-to-back pair: {', '.join(f'{r:.2f}' for r in pair_ratios)} (median {pair_ratios[len(pair_ratios) // 2]:.2f})")
    print(f"evaluate throughput / bare loop = {bare / framework:.2f} (best of each; goal >= 0.90)")


if __name__ == "__main__":
    main()
