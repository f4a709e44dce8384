"""Datasets, sources and the datamodule shared by every method."""

from robustft.data.datamodule import IndexedDataset, OODDataModule
from robustft.data.sources import DATASET_SOURCES, DataConfigError, DatasetSpec, LabeledImages, load_dataset

__all__ = [
    "DATASET_SOURCES",
    "DataConfigError",
    "DatasetSpec",
    "IndexedDataset",
    "LabeledImages",
    "OODDataModule",
    "load_dataset",
]
