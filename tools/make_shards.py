"""Write any robustft dataset source as webdataset tar shards (lossless PNG images).

Each sample is ``<key>.png`` (the image, PNG so pixels survive exactly), ``<key>.cls`` (the integer
label) and, with ``--caption``, ``<key>.txt`` (e.g. ``"a photo of a cat."`` for CLIP-style training).
Shards are written with ``webdataset.ShardWriter``; a JSON manifest lists them with their sample
counts and the class names, and is what ``source: webdataset`` reads best (``path: .../manifest.json``):

    {"shards": [{"url": "train-000000.tar", "count": 1000}, ...], "total": N, "class_names": [...]}

Examples:

    python tools/make_shards.py --source npz --path data/cifar10/cifar10_test_2k.npz \\
        --out shards/cifar10_test --prefix test --maxcount 500
    python tools/make_shards.py --source cifar10 --path data --split train --out shards/c10 \\
        --prefix train --caption "a photo of a {}."
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robustft.data.sources import DATASET_SOURCES, DatasetSpec, LabeledImages, load_dataset  # noqa: E402


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless; level 1 = fast to write and to read
    return buffer.getvalue()


def caption(template: str, class_name: str) -> str:
    return template.format(class_name.replace("_", " "))


def write_shards(
    dataset: LabeledImages,
    out: str | Path,
    prefix: str = "shard",
    maxcount: int = 1000,
    maxsize: float = 3e9,
    caption_template: str | None = None,
    manifest_name: str = "manifest.json",
    progress: bool = True,
) -> dict:
    """Write ``dataset`` as ``<out>/<prefix>-NNNNNN.tar`` shards and ``<out>/<manifest_name>``; return the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if maxcount < 1:
        raise ValueError(f"--maxcount must be >= 1, got {maxcount}")
    counts: OrderedDict[str, int] = OrderedDict()
    width = max(6, len(str(max(len(dataset) - 1, 0))))
    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0) as writer:
        for index in tqdm(range(len(dataset)), desc=f"writing {prefix} shards", unit="img", disable=not progress):
            image, label = dataset[index]
            sample = {"__key__": f"{index:0{width}d}", "png": png_bytes(image), "cls": int(label)}
            if caption_template is not None:
                sample["txt"] = caption(caption_template, dataset.class_names[int(label)])
            writer.write(sample)
            name = os.path.basename(writer.fname)
            counts[name] = counts.get(name, 0) + 1
    manifest = {
        "shards": [{"url": name, "count": count} for name, count in counts.items()],
        "total": sum(counts.values()),
        "class_names": list(dataset.class_names),
    }
    tmp = out / f".{manifest_name}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / manifest_name)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help=f"dataset source: {', '.join(DATASET_SOURCES.names())}")
    parser.add_argument("--path", required=True, help="what the source reads (file, folder, pattern)")
    parser.add_argument("--split", default="test", help="train/test for sources holding both (CIFAR, MNIST)")
    parser.add_argument("--max-samples", type=int, default=None, help="seeded random subset of this size")
    parser.add_argument("--seed", type=int, default=0, help="seed of --max-samples")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--prefix", default="shard", help="shard file prefix: <prefix>-000000.tar")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    parser.add_argument("--maxsize", type=float, default=3e9, help="bytes per shard (upper bound)")
    parser.add_argument("--caption", default=None, metavar="TEMPLATE",
                        help='also write .txt captions from a template, e.g. "a photo of a {}."')
    parser.add_argument("--manifest", default="manifest.json", help="manifest file name inside --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    spec = DatasetSpec(source=args.source, path=args.path, split=args.split, max_samples=args.max_samples, seed=args.seed)
    dataset = load_dataset(spec, "dataset")
    manifest = write_shards(
        dataset, args.out, args.prefix, args.maxcount, args.maxsize, args.caption, args.manifest, not args.quiet
    )
    print(f"wrote {manifest['total']} samples in {len(manifest['shards'])} shards to {args.out}/{args.manifest}")
    return manifest


if __name__ == "__main__":
    main()
