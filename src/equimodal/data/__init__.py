"""Datasets, splits and batches."""

from equimodal.data.base import DatasetInfo, FeatureSplit, ModalitySpec, MultimodalData
from equimodal.data.batch import MultimodalBatch
from equimodal.data.registry import dataset_names, get_entry, load_dataset, register_dataset

__all__ = [
    "DatasetInfo",
    "FeatureSplit",
    "ModalitySpec",
    "MultimodalBatch",
    "MultimodalData",
    "dataset_names",
    "get_entry",
    "load_dataset",
    "register_dataset",
]
