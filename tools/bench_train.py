"""``fit`` training steps/s against a hand-written PyTorch loop: same model, data, augmentation, optimizer, batch.

Why: the framework (LightningCLI, the Lightning fit loop, OODMethod's loss checks and logging, the
resumable sampler) should cost almost nothing per step next to the model's own forward and backward.
The hand-written loop is what one writes without robustft: decode the same npz, the same torchvision
``crop_flip`` (pad-4 random crop + horizontal flip) per sample in a plain ``DataLoader`` (batch 128,
shuffled, workers in the main process), the same CIFAR ResNet with the same weights and a linear head,
SGD (lr 0.01, momentum 0.9, weight decay 5e-4) on cross-entropy. ``fit`` runs through the real CLI
(``robustft.cli.main``, the quickstart's model / data / optimizer, no validation, no OOD evaluation, no
checkpoint, no logger). Both are timed over the same steps after ``--warmup`` steps, in this one
process, alternating, best of ``--repeats``; the ratio is ``fit steps/s / hand-written steps/s``
(the issue's goal: >= 0.95):

    python tools/bench_train.py [--steps 30] [--warmup 3] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from robustft.backbones import create_backbone
from robustft.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from robustft.cli import main as cli_main
from robustft.data.sources import DatasetSpec, load_dataset

REPO = Path(__file__).resolve().parents[1]
TRAIN = "data/cifar10/cifar10_train_5k_jpeg.npz"
WEIGHTS = "data/weights/resnet20-12fca82f.th"
BATCH = 128


class StepTimer(pl.Callback):
    """Wall time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.started, self.seconds = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.warmup:
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        self.seconds = time.perf_counter() - self.started


def fit_config(root: Path, steps: int) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": steps, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root),
        },
        "model": {
            "class_path": "robustft.methods.Classifier",
            "init_args": {
                "num_classes": 10, "backbone": "cifar_resnet20", "backbone_weights": WEIGHTS, "scores": ["msp"],
                "optimizer": {"class_path": "torch.optim.SGD",
                              "init_args": {"lr": 0.01, "momentum": 0.9, "weight_decay": 5.0e-4}},
            },
        },
        "data": {
            "class_path": "robustft.data.OODDataModule",
            "init_args": {
                "train": {"source": "npz", "path": TRAIN},
                "test": {"source": "npz", "path": "data/cifar10/cifar10_test_2k.npz", "max_samples": 10},
                "ood": {"far": {"dtd": {"source": "npz", "path": "data/dtd/dtd_10class_32.npz", "max_samples": 10}}},
                "batch_size": BATCH, "augmentation": "crop_flip",
            },
        },
    }


def run_fit(config_path: Path, warmup: int) -> float:
    """Seconds of the timed steps of ``fit`` through the real CLI."""
    timer = StepTimer(warmup)
    with contextlib.redirect_stdout(io.StringIO()):
        cli = cli_main(["--config", str(config_path)], run=False)
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.seconds


class Augmented(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels
        self.transform = T.Compose([
            T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def hand_written(steps: int, warmup: int) -> float:
    """The loop one writes by hand; seconds of the same timed steps."""
    torch.manual_seed(0)
    data = load_dataset(DatasetSpec(source="npz", path=str(REPO / TRAIN)), "train")
    images = np.stack([np.asarray(data.load_image(i)) for i in range(len(data))])
    loader = DataLoader(Augmented(images, data.labels), batch_size=BATCH, shuffle=True, num_workers=0)
    state = torch.load(REPO / WEIGHTS, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.get("state_dict", state).items()}
    backbone = create_backbone("cifar_resnet20")
    backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("linear.")}, strict=False)
    head = torch.nn.Linear(state["linear.weight"].shape[1], 10)
    head.load_state_dict({"weight": state["linear.weight"], "bias": state["linear.bias"]})
    model = torch.nn.Sequential(backbone, head).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    step, started = 0, 0.0
    while step < steps:
        for x, y in loader:
            if step == warmup:
                started = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timed = args.steps - args.warmup
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "fit.yaml"
        config_path.write_text(yaml.safe_dump(fit_config(Path(tmp) / "run", args.steps)))
        bares, frameworks = [], []
        for _ in range(args.repeats):
            bares.append(hand_written(args.steps, args.warmup))
            frameworks.append(run_fit(config_path, args.warmup))
    bare, framework = min(bares), min(frameworks)
    pair_ratios = sorted(b / f for b, f in zip(bares, frameworks, strict=True))
    print(f"ResNet-20, batch {BATCH}, crop_flip, SGD, {timed} timed steps after {args.warmup} warm-up steps, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print(f"hand-written loop: {timed / bare:6.3f} steps/s ({BATCH * timed / bare:7.1f} images/s)")
    print(f"robustft fit:      {timed / framework:6.3f} steps/s ({BATCH * timed / framework:7.1f} images/s)")
    print(f"per back-to-back pair: {', '.join(f'{r:.2f}' for r in pair_ratios)} (median {pair_ratios[len(pair_ratios) // 2]:.2f})")
    print(f"fit steps/s / hand-written steps/s = {bare / framework:.2f} (best of each; goal >= 0.95)")


if __name__ == "__main__":
    main()
