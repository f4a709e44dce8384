"""Datasets, sources and the datamodule shared by every method."""

from robustft.data.datamodule import IndexedDataset, OODDataModule
from robustft.data.sources import DATASET_SOURCES, DataConfigError, DatasetSpec, LabeledImages, load_dataset
from robustft.data.webdataset_source import StreamConfig, WebDataModule  # also registers `source: webdataset`

__all__ = [
    "DATASET_SOURCES",
    "DataConfigError",
    "DatasetSpec",
    "IndexedDataset",
    "LabeledImages",
    "OODDataModule",
    "StreamConfig",
    "WebDataModule",
    "load_dataset",
]
