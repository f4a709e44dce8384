"""webdataset shards: an indexed (map-style) source for evaluation and a resampled stream for training.

Split along its seams:

- :mod:`robustft.data.shards` -- which shard files a ``path`` names (brace pattern, glob, directory,
  manifest) and the index of a tar's members;
- :mod:`robustft.data.shard_images` -- the ``webdataset`` dataset source (:class:`ShardImages`), read by
  index so that distributed evaluation counts every sample once;
- :mod:`robustft.data.shard_stream` -- :class:`WebDatasetTrainStream`, :class:`StreamLoader` and
  :class:`WebDataModule` (``data.train`` streamed from shards).

Importing this module registers ``source: webdataset``; its names are re-exported here.
"""

from robustft.data.shard_images import ShardImages, load_webdataset
from robustft.data.shard_stream import (
    StreamConfig,
    StreamLoader,
    WebDataModule,
    WebDatasetTrainStream,
    stream_collate,
)
from robustft.data.shards import (
    IMAGE_KEYS,
    LABEL_KEYS,
    MANIFEST_NAME,
    ShardList,
    decode_image,
    index_tar,
    parse_label,
    pick_image_key,
    resolve_shards,
    split_key,
)

__all__ = [
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "MANIFEST_NAME",
    "ShardImages",
    "ShardList",
    "StreamConfig",
    "StreamLoader",
    "WebDataModule",
    "WebDatasetTrainStream",
    "decode_image",
    "index_tar",
    "load_webdataset",
    "parse_label",
    "pick_image_key",
    "resolve_shards",
    "split_key",
    "stream_collate",
]
