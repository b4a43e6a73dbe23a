"""Datasets, splits and batches."""

from equimodal.data.base import DatasetInfo, FeatureSplit, ModalitySpec, MultimodalData
from equimodal.data.batch import MultimodalBatch, collate_items
from equimodal.data.registry import dataset_names, get_entry, load_dataset, register_dataset

__all__ = [
    "DatasetInfo",
    "FeatureSplit",
    "ModalitySpec",
    "MultimodalBatch",
    "MultimodalData",
    "collate_items",
    "dataset_names",
    "get_entry",
    "load_dataset",
    "register_dataset",
]
