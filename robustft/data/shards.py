"""webdataset shards on disk: which files a ``path`` names, and where each sample sits inside a tar.

Shards are plain POSIX tar files in which the files sharing a basename form one sample
(``000001.png`` + ``000001.cls`` [+ ``000001.txt``]); ``tools/make_shards.py`` writes them with
``webdataset.ShardWriter``, but any ``tar`` of such files works. Used by the map-style source
(:mod:`robustft.data.shard_images`) and the training stream (:mod:`robustft.data.shard_stream`).
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
from PIL import Image

from robustft.data.sources import DataConfigError

#: member extensions read as the sample's image, in order of preference
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "pnm")
#: member extensions read as the sample's integer label, in order of preference
LABEL_KEYS = ("cls", "label", "class")
#: member extensions holding a caption (CC3M-style ``.txt``; CLIP methods read it as ``batch["text"]``)
TEXT_KEYS = ("txt", "caption", "text")
MANIFEST_NAME = "manifest.json"


# ------------------------------------------------------------------------------------------ shards


@dataclass
class ShardList:
    """The shard files a ``path`` names, plus what a manifest says about them (if there is one)."""

    paths: list[str]
    class_names: list[str] | None = None
    counts: list[int] | None = None  # samples per shard, from a manifest


def _read_manifest(path: Path, field_name: str) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataConfigError(f"{field_name}.path: cannot read manifest '{path}' ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DataConfigError(
            f"{field_name}.path: '{path}' is not a shard manifest; expected "
            '{"shards": [{"url": ..., "count": ...}], "total": N, "class_names": [...]}'
        )
    return manifest


def resolve_shards(path: str, field_name: str = "data") -> ShardList:
    """Shard files named by ``path``: a manifest ``.json`` (urls relative to it), a brace pattern
    (``train-{000000..000009}.tar``), a glob, a directory of ``.tar`` files, or one ``.tar`` file.

    A directory (or the folder of a pattern) holding ``manifest.json`` takes its ``class_names``.
    """
    manifest_path: Path | None = None
    if path.endswith(".json"):
        manifest_path = Path(path)
        if not manifest_path.is_file():
            raise DataConfigError(f"{field_name}.path: manifest '{path}' does not exist")
        manifest = _read_manifest(manifest_path, field_name)
        root = manifest_path.parent
        paths = []
        for entry in manifest["shards"]:
            url = entry["url"] if isinstance(entry, dict) else str(entry)
            paths.append(url if os.path.isabs(url) else str(root / url))
        counts = [int(e["count"]) for e in manifest["shards"] if isinstance(e, dict) and "count" in e]
        return ShardList(
            _check_exist(paths, path, field_name),
            manifest.get("class_names"),
            counts if len(counts) == len(paths) else None,
        )
    if "{" in path:
        paths = list(braceexpand.braceexpand(path))
        folder = Path(paths[0]).parent if paths else Path(".")
    elif any(c in path for c in "*?["):
        paths = sorted(glob.glob(path))
        folder = Path(path).parent
    elif Path(path).is_dir():
        folder = Path(path)
        paths = sorted(str(p) for p in folder.iterdir() if p.name.endswith(".tar"))
    else:
        paths = [path]
        folder = Path(path).parent
    if not paths:
        raise DataConfigError(
            f"{field_name}.path: '{path}' names no .tar shards. Give a brace pattern "
            "(train-{000000..000009}.tar), a directory of .tar files or a manifest .json"
        )
    paths = _check_exist(paths, path, field_name)
    class_names = None
    if (folder / MANIFEST_NAME).is_file():
        class_names = _read_manifest(folder / MANIFEST_NAME, field_name).get("class_names")
    return ShardList(paths, class_names)


def _check_exist(paths: list[str], pattern: str, field_name: str) -> list[str]:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataConfigError(
            f"{field_name}.path: {len(missing)} of {len(paths)} shards named by '{pattern}' do not exist "
            f"(first: '{missing[0]}')"
        )
    return paths


def split_key(name: str) -> tuple[str | None, str | None]:
    """webdataset's sample grouping: key = path up to the first dot of the basename, rest = extension."""
    folder, _, base = name.rpartition("/")
    if "." not in base:
        return None, None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def pick_image_key(keys: Sequence[str]) -> str | None:
    for key in IMAGE_KEYS:
        if key in keys:
            return key
    for key in keys:  # e.g. "image.png", "seg.jpg"
        if key.rsplit(".", 1)[-1] in IMAGE_KEYS:
            return key
    return None


def parse_label(data: bytes) -> int:
    return int(data.decode("utf-8").strip())


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def index_tar(path: str) -> dict[str, tuple[tuple[int, int] | None, int | None, str | None]]:
    """``{sample key: ((image offset, image size) | None, label | None, caption | None)}`` in order of
    first appearance (labels and captions are small, so they are read at indexing time).

    Members are grouped by key wherever they sit in the tar (a plain ``tar`` need not keep a sample's
    files adjacent); directories and webdataset's ``__meta__`` members are skipped.
    """
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    with open(path, "rb") as handle:
        if handle.read(2) == b"\x1f\x8b":
            raise tarfile.ReadError("compressed (gzip) shards cannot be read by index; store them as plain .tar")
        handle.seek(0)
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = split_key(info.name)
                if key is None or os.path.basename(key).startswith("__"):
                    continue
                members.setdefault(key, {})[ext] = info
        fd = handle.fileno()
        out: dict[str, tuple[tuple[int, int] | None, int | None, str | None]] = {}
        for key, files in members.items():
            image_key = pick_image_key(list(files))
            image = (files[image_key].offset_data, files[image_key].size) if image_key else None
            label_key = next((k for k in LABEL_KEYS if k in files), None)
            label = None
            if label_key is not None:
                info = files[label_key]
                label = parse_label(os.pread(fd, info.size, info.offset_data))
            text_key = next((k for k in TEXT_KEYS if k in files), None)
            text = None
            if text_key is not None:
                info = files[text_key]
                text = os.pread(fd, info.size, info.offset_data).decode("utf-8").strip()
            out[key] = (image, label, text)
    return out

