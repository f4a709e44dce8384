"""Run every offline config of configs/ for one step (``fast_dev_run``), in dependency order.

    .venv/bin/python tools/smoke_configs.py                                   # CPU
    .venv/bin/python tools/smoke_configs.py --accelerator gpu --precision bf16-mixed

Each config runs in a scratch folder that links ``data/`` and ``configs/``, so ``runs/`` outputs (the
tiny CLIP weights that the zero-shot, CMA and WiSE-FT configs load) never touch the checkout. The
ImageNet config needs ImageNet and CLIP ViT-B/16 weights: it is only parsed (``--print_config``).
Prints one line per config and exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: (config, subcommand) in dependency order: the tiny CLIP pre-training writes the weights the others load
RUNS = [
    ("configs/quickstart.yaml", "fit"),
    ("configs/wise_ft/cifar10_resnet20.yaml", "fit"),
    ("configs/clip/tiny_pretrain_cifar10.yaml", "fit"),
    ("configs/clip/zero_shot_cifar10.yaml", "validate"),
    ("configs/clip/cma_cifar10.yaml", "fit"),
    ("configs/wise_ft/cifar10_tiny_clip.yaml", "fit"),
]
PARSE_ONLY = ["configs/wise_ft/imagenet_vit_b16.yaml"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default=None, help="e.g. bf16-mixed")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    trainer_flags = ["--trainer.accelerator", args.accelerator, "--trainer.devices", "1"]
    if args.precision:
        trainer_flags += ["--trainer.precision", args.precision]
    failed = 0
    with tempfile.TemporaryDirectory(prefix="robustft-smoke-") as scratch:
        for name in ("data", "configs"):
            os.symlink(REPO / name, Path(scratch) / name)
        for config, subcommand in [*RUNS, *[(c, "parse") for c in PARSE_ONLY]]:
            if subcommand == "parse":
                cmd = ["fit", "--config", config, "--print_config"]
            elif subcommand == "fit":
                cmd = ["fit", "--config", config, "--trainer.fast_dev_run", "1", *trainer_flags]
            else:
                cmd = [subcommand, "--config", config, "--trainer.limit_val_batches", "1", *trainer_flags]
            started = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "robustft", *cmd], cwd=scratch, capture_output=True,
                                    text=True, timeout=args.timeout)
            seconds = time.perf_counter() - started
            status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
            print(f"{config:45s} {subcommand:9s} {status:18s} {seconds:6.1f} s", flush=True)
            if result.returncode != 0:
                failed += 1
                print("\n".join("    " + line for line in (result.stderr or result.stdout).splitlines()[-15:]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
