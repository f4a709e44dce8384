"""Write the shifted unlabelled pool of configs/dro_ssl/cifar10_resnet20_offline.yaml.

    .venv/bin/python experiments/dro_ssl/make_shifted_pool.py     # -> runs/dro_ssl/cifar10_5k_shifted.npz

Every image of the bundled CIFAR-10 training subset (5,000 JPEG re-encodings) with a CIFAR-10-C-style
corruption from ``robustft.data.shifts`` (Gaussian noise, then contrast, both severity 3; seeded per
image), stored as an ``npz`` source (``images`` NHWC uint8, ``labels`` kept for diagnostics only -- the
``unlabeled:`` stream hands them over as ``true_label`` and the method never trains on them).
Caveat: the few-shot labelled images are drawn from the same 5,000, so their corrupted copies are in the
pool (K * 10 of 5,000); the pool is a covariate-shifted copy of the training distribution, not new images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from robustft.data.shifts import corrupt
from robustft.data.sources import DatasetSpec, load_dataset

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs/dro_ssl/cifar10_5k_shifted.npz")
    parser.add_argument("--severity", type=int, default=3)
    args = parser.parse_args()
    base = load_dataset(DatasetSpec(source="npz", path=str(REPO / "data/cifar10/cifar10_train_5k_jpeg.npz")), "train")
    images = []
    for i in range(len(base)):
        x = np.asarray(base.load_image(i).convert("RGB"))
        x = corrupt(x, "gaussian_noise", args.severity, np.random.default_rng([1, i]))
        x = corrupt(x, "contrast", args.severity, np.random.default_rng([2, i]))
        images.append(x)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=np.stack(images), labels=np.asarray(base.labels, dtype=np.int64),
                        class_names=np.asarray(base.class_names))
    print(f"wrote {args.out} ({len(images)} images)")


if __name__ == "__main__":
    main()
