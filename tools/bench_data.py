"""Images per second of the dataset readers on the same images, measured in one run.

The bundled CIFAR-10 test subset (2000 images, ``data/cifar10/cifar10_test_2k.npz``) is written to a
temporary directory as webdataset shards (``tools/make_shards.py``, PNG) and as a PNG image folder,
then each reader decodes every image to an RGB PIL image:

- ``npz``: the in-memory ``.npz`` arrays (the reference; no decoding, only array -> PIL);
- ``shards (indexed)``: ``source: webdataset``, random access by index (what evaluation uses);
- ``shards (stream)``: webdataset's sequential tar reader + PNG decoding (what training streams use);
- ``folder``: ``source: folder``, one PNG file per image.

"open" is the one-off cost of building the dataset (reading the npz, indexing the tar members, listing
the folder); "images/s" is the steady-state read + decode rate over all images (best of ``--repeats``).
Ratios are against ``npz``. Run from the repository root:

    python tools/bench_data.py [--npz data/cifar10/cifar10_test_2k.npz] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_shards import write_shards  # noqa: E402

from robustft.data.sources import DatasetSpec, LabeledImages, load_dataset  # noqa: E402
from robustft.data.webdataset_source import resolve_shards  # noqa: E402


def write_folder(dataset: LabeledImages, root: Path) -> None:
    for name in dataset.class_names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(len(dataset)):
        image, label = dataset[i]
        image.save(root / dataset.class_names[label] / f"{i:06d}.png", compress_level=1)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def read_all(dataset: LabeledImages) -> int:
    for i in range(len(dataset)):
        image, _ = dataset[i]
        image.load()
    return len(dataset)


def stream_all(urls: list[str]) -> int:
    count = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        with Image.open(io.BytesIO(sample["png"])) as image:
            image.convert("RGB").load()
        count += 1
    return count


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npz", default="data/cifar10/cifar10_test_2k.npz")
    parser.add_argument("--maxcount", type=int, default=500, help="images per shard")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    reference = load_dataset(DatasetSpec(source="npz", path=args.npz), "npz")
    n = len(reference)
    with tempfile.TemporaryDirectory(prefix="robustft-bench-") as tmp:
        shard_dir, folder = Path(tmp) / "shards", Path(tmp) / "folder"
        write_shards(reference, shard_dir, prefix="bench", maxcount=args.maxcount, progress=False)
        write_folder(reference, folder)
        urls = resolve_shards(str(shard_dir / "manifest.json")).paths
        readers: dict[str, tuple[Callable[[], object], Callable[[object], int]]] = {
            "npz": (lambda: load_dataset(DatasetSpec(source="npz", path=args.npz), "npz"), read_all),
            "shards (indexed)": (
                lambda: load_dataset(DatasetSpec(source="webdataset", path=str(shard_dir / "manifest.json")), "wds"),
                read_all,
            ),
            "shards (stream)": (lambda: urls, stream_all),
            "folder": (lambda: load_dataset(DatasetSpec(source="folder", path=str(folder)), "folder"), read_all),
        }
        rows = []
        for name, (open_fn, read_fn) in readers.items():
            open_s, dataset = timed(open_fn)
            best = min(timed(lambda d=dataset, f=read_fn: f(d))[0] for _ in range(args.repeats))
            rows.append({"reader": name, "open_s": open_s, "images_per_s": n / best})
    base = rows[0]["images_per_s"]
    print(f"{n} images from {args.npz}, best of {args.repeats}")
    print(f"{'reader':<18} {'open (s)':>9} {'images/s':>10} {'vs npz':>7}")
    for row in rows:
        row["ratio_vs_npz"] = row["images_per_s"] / base
        print(f"{row['reader']:<18} {row['open_s']:>9.3f} {row['images_per_s']:>10.0f} {row['ratio_vs_npz']:>7.2f}")
    return rows


if __name__ == "__main__":
    main()
