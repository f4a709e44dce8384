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

The GPU path for small images (``data.device_augmentation``: the set decoded once into uint8, crop and
flip and normalisation on the device; ``--channels-last``: the ``ChannelsLast`` callback; ``--precision
bf16-mixed``) against the same hand-written loop written that way (uint8 tensor indexed per batch,
copied, augmented by ``robustft.data.device_augment.augment_batch``, ``torch.autocast``):

    python tools/bench_train.py --device-augmentation [--accelerator gpu] [--channels-last] [--precision bf16-mixed]
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
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the GPU's work of this step, not just its launch
        self.seconds = time.perf_counter() - self.started


def fit_config(root: Path, steps: int, args: argparse.Namespace | None = None) -> dict:
    device_augmentation = bool(args and args.device_augmentation)
    callbacks = [{"class_path": "robustft.data.device_augment.ChannelsLast"}] if args and args.channels_last else []
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": args.accelerator if args else "cpu", "devices": 1, "max_steps": steps,
            "precision": args.precision if args else "32-true", "callbacks": callbacks, "limit_val_batches": 0,
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
                "batch_size": BATCH, "augmentation": "crop_flip", "device_augmentation": device_augmentation,
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


def device_batches(images: np.ndarray, labels: np.ndarray, device: torch.device):  # noqa: ANN201 - generator
    """The hand-written device path: one uint8 tensor (pinned with CUDA), shuffled index batches, copied
    to ``device`` and augmented there; yields ``(float images, labels)`` forever."""
    from robustft.backbones.base import PreprocessConfig
    from robustft.data.device_augment import augment_batch

    store = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    store = store.pin_memory() if device.type == "cuda" else store
    targets = torch.as_tensor(labels, dtype=torch.long)
    cfg = PreprocessConfig(image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    generator = torch.Generator().manual_seed(0)
    while True:
        order = torch.randperm(len(targets), generator=generator)
        for start in range(0, len(order), BATCH):
            chosen = order[start:start + BATCH]
            x = store[chosen].to(device, non_blocking=True)
            yield augment_batch(x, cfg, "crop_flip"), targets[chosen].to(device, non_blocking=True)


def hand_written(steps: int, warmup: int, args: argparse.Namespace | None = None) -> float:
    """The loop one writes by hand; seconds of the same timed steps."""
    torch.manual_seed(0)
    device = torch.device("cuda" if args and args.accelerator == "gpu" else "cpu")
    data = load_dataset(DatasetSpec(source="npz", path=str(REPO / TRAIN)), "train")
    images = np.stack([np.asarray(data.load_image(i)) for i in range(len(data))])
    if args and args.device_augmentation:
        loader = device_batches(images, data.labels, device)
    else:
        loader = DataLoader(Augmented(images, data.labels), batch_size=BATCH, shuffle=True, num_workers=0)
    state = torch.load(REPO / WEIGHTS, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.get("state_dict", state).items()}
    backbone = create_backbone("cifar_resnet20")
    backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("linear.")}, strict=False)
    head = torch.nn.Linear(state["linear.weight"].shape[1], 10)
    head.load_state_dict({"weight": state["linear.weight"], "bias": state["linear.bias"]})
    model = torch.nn.Sequential(backbone, head).train().to(device)
    if args and args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    bf16 = bool(args and args.precision.startswith("bf16"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    step, started = 0, 0.0
    while step < steps:
        for x, y in loader:
            if step == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device-augmentation", action="store_true",
                        help="data.device_augmentation: true (and the hand-written loop's device path)")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timed = args.steps - args.warmup
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "fit.yaml"
        config_path.write_text(yaml.safe_dump(fit_config(Path(tmp) / "run", args.steps, args)))
        bares, frameworks = [], []
        for _ in range(args.repeats):
            bares.append(hand_written(args.steps, args.warmup, args))
            frameworks.append(run_fit(config_path, args.warmup))
    bare, framework = min(bares), min(frameworks)
    pair_ratios = sorted(b / f for b, f in zip(bares, frameworks, strict=True))
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else "CPU"
    print(f"ResNet-20, batch {BATCH}, crop_flip{' on the device' if args.device_augmentation else ''}, SGD, "
          f"{timed} timed steps after {args.warmup} warm-up steps, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats}; {device}, precision {args.precision}, channels_last {args.channels_last}")
    print(f"hand-written loop: {timed / bare:6.3f} steps/s ({BATCH * timed / bare:7.1f} images/s)")
    print(f"robustft fit:      {timed / framework:6.3f} steps/s ({BATCH * timed / framework:7.1f} images/s)")
    print(f"per back-to-back pair: {', '.join(f'{r:.2f}' for r in pair_ratios)} (median {pair_ratios[len(pair_ratios) // 2]:.2f})")
    print(f"fit steps/s / hand-written steps/s = {bare / framework:.2f} (best of each; goal >= 0.95)")


if __name__ == "__main__":
    main()
