"""Rebuild the small real-data bundle in ``data/`` from the full copies in ``../shared/data``.

The bundle is what the quickstart, the tests and CI use on a machine that has nothing but a clone of
this repository, so it must stay small (under 20 MB) while being real data. This script records
exactly how each file was cut, so the bundle can be regenerated and audited. Run it from the repo root:

    python tools/make_bundled_data.py --shared ../shared/data --out data
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import shutil
import struct
from pathlib import Path

import numpy as np

#: TinyImageNet classes that overlap CIFAR-10 semantically (cats, dogs, birds, frogs, cars, trucks,
#: buses, boats, deer-like). They are removed so that "TIN" is a clean near-OOD set for CIFAR-10,
#: as OpenOOD does for its TIN split. Matched on the first WordNet name of each class.
TIN_OVERLAPPING_CIFAR10 = (
    "Egyptian cat", "tabby", "Persian cat",
    "German shepherd", "Labrador retriever", "golden retriever", "Yorkshire terrier", "Chihuahua",
    "standard poodle",
    "goose", "albatross", "king penguin", "black stork",
    "bullfrog", "tailed frog",
    "sports car", "convertible", "limousine", "beach wagon", "go-kart",
    "moving van", "police van", "school bus", "trolleybus",
    "lifeboat", "gondola",
    "gazelle",
)
#: Number of non-overlapping TIN classes held out as an OOD *validation* set (hyper-parameter tuning
#: only, never reported as a test result), following OpenOOD v1.5.
TIN_VAL_CLASSES = 20


def _first_name(name: str) -> str:
    return str(name).split(",")[0].strip()


def cifar_train_subset(shared: Path, out: Path, per_class: int) -> None:
    """First ``per_class`` images of each class of the full train split, kept as their JPEG bytes."""
    src = np.load(shared / "cifar10" / "cifar10_train_jpeg_bytes.npz", allow_pickle=False)
    labels, offsets, blob = src["labels"], src["offsets"], src["jpeg_bytes"]
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    chunks = [blob[offsets[i] : offsets[i + 1]] for i in keep]
    new_offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
    np.savez(
        out / "cifar10" / f"cifar10_train_{per_class * 10 // 1000}k_jpeg.npz",
        jpeg_bytes=np.concatenate(chunks),
        offsets=new_offsets,
        labels=labels[keep].astype(np.int64),
        class_names=src["class_names"],
        source_paths=src["source_paths"][keep],
    )


def cifar_test_subset(shared: Path, out: Path, per_class: int) -> None:
    """First ``per_class`` test images of each class, as decoded uint8 pixels."""
    src = np.load(shared / "cifar10" / "cifar10_test_jpeg.npz", allow_pickle=False)
    keep = np.concatenate([np.flatnonzero(src["labels"] == c)[:per_class] for c in range(10)])
    np.savez_compressed(
        out / "cifar10" / f"cifar10_test_{per_class * 10 // 1000}k.npz",
        images=src["images"][keep],
        labels=src["labels"][keep].astype(np.int64),
        class_names=src["class_names"],
        source_paths=src["source_paths"][keep],
    )


def tinyimagenet_split(shared: Path, out: Path, seed: int) -> None:
    """TIN without CIFAR-10-like classes, split by class into OOD-val and OOD-test."""
    src = np.load(shared / "tinyimagenet" / "tinyimagenet_val_32_2000.npz", allow_pickle=False)
    names = [_first_name(n) for n in src["class_names"]]
    missing = set(TIN_OVERLAPPING_CIFAR10) - set(names)
    if missing:
        raise SystemExit(f"TIN class names not found: {sorted(missing)}")
    clean = [i for i, n in enumerate(names) if n not in TIN_OVERLAPPING_CIFAR10]
    rng = np.random.default_rng(seed)
    val_classes = set(rng.choice(clean, size=TIN_VAL_CLASSES, replace=False).tolist())
    for split, classes in (("val", val_classes), ("test", set(clean) - val_classes)):
        keep = np.flatnonzero(np.isin(src["labels"], sorted(classes)))
        np.savez_compressed(
            out / "tinyimagenet" / f"tin_{split}_32.npz",
            images=src["images"][keep],
            labels=src["labels"][keep].astype(np.int64),
            class_names=src["class_names"],
            filenames=src["filenames"][keep],
        )


def dtd_subset(shared: Path, out: Path, per_class: int) -> None:
    src = np.load(shared / "dtd" / "dtd_10class_32.npz", allow_pickle=False)
    keep = np.concatenate([np.flatnonzero(src["labels"] == c)[:per_class] for c in range(10)])
    np.savez_compressed(
        out / "dtd" / "dtd_10class_32.npz",
        images=src["images"][keep],
        labels=src["labels"][keep].astype(np.int64),
        class_names=src["class_names"],
        filenames=src["filenames"][keep],
    )


def mnist_subset(shared: Path, out: Path, count: int) -> None:
    """The first ``count`` MNIST test images and labels, still in the original IDX format."""
    with gzip.open(shared / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    images = raw[16 : 16 + count * rows * cols]
    with gzip.open(shared / "mnist" / "t10k-labels-idx1-ubyte.gz") as f:
        raw_labels = f.read()
    labels = raw_labels[8 : 8 + count]
    dst = out / "mnist"
    with gzip.GzipFile(dst / "t10k-images-idx3-ubyte.gz", "wb", mtime=0) as f:
        f.write(struct.pack(">IIII", magic, count, rows, cols) + images)
    with gzip.GzipFile(dst / "t10k-labels-idx1-ubyte.gz", "wb", mtime=0) as f:
        f.write(struct.pack(">II", 2049, count) + labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("data"))
    args = parser.parse_args()
    for sub in ("cifar10", "tinyimagenet", "dtd", "mnist", "weights"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    cifar_train_subset(args.shared, args.out, per_class=500)
    cifar_test_subset(args.shared, args.out, per_class=200)
    shutil.copy(args.shared / "cifar10" / "cifar10_kaggle_train200_png.npz", args.out / "cifar10")
    tinyimagenet_split(args.shared, args.out, seed=0)
    dtd_subset(args.shared, args.out, per_class=60)
    mnist_subset(args.shared, args.out, count=2000)
    weights = args.shared / "weights" / "cifar10_resnet_akamaster"
    shutil.copy(weights / "resnet20-12fca82f.th", args.out / "weights")
    shutil.copy(weights / "LICENSE", args.out / "weights" / "LICENSE-akamaster-BSD-2-Clause")
    for path in sorted(p for p in args.out.rglob("*") if p.is_file() and p.suffix != ".md"):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{digest}  {path.relative_to(args.out)}  ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
