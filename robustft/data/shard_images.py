"""The ``webdataset`` dataset source: tar shards read by index (map-style).

Evaluation must count every sample exactly once across ranks, which a webdataset *stream* cannot
promise (webdataset FAQ, issues #225/#364). So this source indexes the tar members once (offset and
size of every member, read with :mod:`tarfile`) and serves samples by index: it is an ordinary
:class:`~robustft.data.sources.LabeledImages`, and the existing
:class:`~robustft.evaluation.distributed.ShardSampler` reads each sample on exactly one rank.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Sequence

import numpy as np
from PIL import Image

from robustft.data.shards import IMAGE_KEYS, ShardList, decode_image, index_tar, resolve_shards
from robustft.data.sources import DATASET_SOURCES, DataConfigError, DatasetSpec, LabeledImages


class ShardImages(LabeledImages):
    """Samples of tar shards read by index: the members of every shard are indexed once (offset and
    size of each sample's image; labels read at indexing time), then each image is one ``pread``.

    Safe with DataLoader workers (file descriptors are per process, reads are positional).
    """

    def __init__(
        self,
        shards: Sequence[str],
        shard_index: np.ndarray,
        offsets: np.ndarray,
        sizes: np.ndarray,
        labels: np.ndarray,
        class_names: Sequence[str],
        keys: Sequence[str] | None = None,
        texts: Sequence[str] | None = None,
    ) -> None:
        self.shards = list(shards)
        self.shard_index = np.asarray(shard_index, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = [str(c) for c in class_names]
        self.keys = list(keys) if keys is not None else None
        self.texts = list(texts) if texts is not None else None  # captions (.txt members), when every sample has one
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    @classmethod
    def from_shards(cls, shard_list: ShardList, field_name: str = "data") -> ShardImages:
        shard_ids: list[int] = []
        offsets: list[int] = []
        sizes: list[int] = []
        labels: list[int] = []
        keys: list[str] = []
        texts: list[str | None] = []
        any_label = False
        for s, shard in enumerate(shard_list.paths):
            try:
                samples = index_tar(shard)
            except (tarfile.TarError, OSError) as exc:
                raise DataConfigError(f"{field_name}.path: cannot read shard '{shard}' as a tar file ({exc})") from exc
            if shard_list.counts is not None and len(samples) != shard_list.counts[s]:
                raise DataConfigError(
                    f"{field_name}.path: shard '{shard}' holds {len(samples)} samples but the manifest says "
                    f"{shard_list.counts[s]}; the shard is truncated or the manifest is stale"
                )
            for key, (image, label, text) in samples.items():
                if image is None:
                    raise DataConfigError(
                        f"{field_name}.path: sample '{key}' of shard '{shard}' has no image member "
                        f"(one of {', '.join(IMAGE_KEYS)})"
                    )
                shard_ids.append(s)
                offsets.append(image[0])
                sizes.append(image[1])
                labels.append(0 if label is None else label)
                any_label |= label is not None
                keys.append(key)
                texts.append(text)
        labels_array = np.asarray(labels, dtype=np.int64)
        if shard_list.class_names is not None:
            class_names = list(shard_list.class_names)
        elif any_label and len(labels_array):
            class_names = [str(i) for i in range(int(labels_array.max()) + 1)]
        else:
            class_names = ["unlabeled"]
        with_text = sum(t is not None for t in texts)
        if 0 < with_text < len(texts):
            raise DataConfigError(
                f"{field_name}.path: {with_text} of {len(texts)} samples have a caption (.txt); give every sample "
                "one, or none (captions then come from class-name templates)"
            )
        captions = [str(t) for t in texts] if with_text else None
        return cls(shard_list.paths, shard_ids, offsets, sizes, labels_array, class_names, keys, captions)

    def _fd(self, shard: int) -> int:
        if os.getpid() != self._pid:  # forked worker: never share descriptors with the parent
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return fd

    def read_bytes(self, index: int) -> bytes:
        size = int(self.sizes[index])
        data = os.pread(self._fd(int(self.shard_index[index])), size, int(self.offsets[index]))
        if len(data) != size:
            raise OSError(f"short read of sample {index} from '{self.shards[int(self.shard_index[index])]}'")
        return data

    def load_image(self, index: int) -> Image.Image:
        return decode_image(self.read_bytes(index))

    def subset(self, indices: np.ndarray) -> ShardImages:
        keys = [self.keys[i] for i in indices] if self.keys is not None else None
        texts = [self.texts[i] for i in indices] if self.texts is not None else None
        return ShardImages(
            self.shards, self.shard_index[indices], self.offsets[indices], self.sizes[indices],
            self.labels[indices], self.class_names, keys, texts,
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_fds", {}).values():
                try:
                    os.close(fd)
                except OSError:
                    pass


@DATASET_SOURCES.register("webdataset")
def load_webdataset(spec: DatasetSpec, field_name: str) -> LabeledImages:
    """webdataset tar shards (``path``: brace pattern, directory of .tar files, or manifest .json),
    indexed for exact map-style access. Labels from ``.cls`` members (0 when absent: unlabeled OOD sets)."""
    return ShardImages.from_shards(resolve_shards(spec.path, field_name), field_name)
