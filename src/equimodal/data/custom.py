"""Your own data from Python: tensors, torch datasets or data loaders as a MultimodalData.

:func:`make_data` turns one source per split into the splits every equimodal trainer,
strategy and evaluation reads. A source is one of:

* ``(inputs, labels)`` or ``(inputs, labels, present)``: ``inputs`` maps each modality to
  a tensor (or NumPy array) with one row per sample, ``present`` optionally maps a
  modality to a boolean mask of the samples that have it. Held in memory and sliced into
  batches directly, the fastest path.
* a map-style :class:`torch.utils.data.Dataset` whose item ``i`` is
  ``(inputs, label)``, ``(inputs, label, present)`` or a dict with the modalities'
  tensors, a ``"label"`` and optionally a ``"present"`` dict. A modality missing from an
  item's inputs (or marked absent) is a missing modality of that sample. Items are read
  by a DataLoader each epoch (see below), so datasets that read files from disk work.
* a :class:`torch.utils.data.DataLoader` over such a dataset: its dataset and
  ``num_workers`` are used; equimodal draws its own seeded batch order with the run's
  ``train.batch_size`` (so runs reproduce and every method sees the same batches), stacks
  the items itself, and ignores the loader's sampler, batch size and ``collate_fn``.

A dataset's labels, presence and per-modality shapes are read once, when
:func:`make_data` is called (one pass over the items). Every present item of a modality
must have the same shape (pad variable-length sequences in the dataset).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from equimodal.data.base import (
    SPLIT_NAMES,
    DatasetInfo,
    FeatureSplit,
    ModalitySpec,
    MultimodalData,
)
from equimodal.data.items import ItemSplit

__all__ = ["make_data", "as_split"]

LABEL_KEYS = ("label", "labels", "y", "target")


def _tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} is not a tensor or array: {err}") from None


def _parse_item(item: Any, where: str) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """``(inputs, label, present)`` of one dataset item, whichever form it has."""
    if isinstance(item, Mapping):
        keys = [k for k in LABEL_KEYS if k in item]
        if not keys:
            raise ValueError(
                f"{where} is a dict without a label (one of the keys {', '.join(LABEL_KEYS)})"
            )
        present = item.get("present") or {}
        inputs = {k: v for k, v in item.items() if k not in (keys[0], "present")}
        if "inputs" in inputs and isinstance(inputs["inputs"], Mapping) and len(inputs) == 1:
            inputs = dict(inputs["inputs"])
        return inputs, item[keys[0]], dict(present)
    if isinstance(item, (tuple, list)) and len(item) in (2, 3) and isinstance(item[0], Mapping):
        present = item[2] if len(item) == 3 else {}
        if not isinstance(present, Mapping):
            raise ValueError(f"{where}: the third element (present) must be a dict of bools")
        return dict(item[0]), item[1], dict(present)
    raise ValueError(
        f"{where} must be (inputs, label), (inputs, label, present) or a dict with a 'label', "
        f"with inputs a dict of modality tensors; got {type(item).__name__}"
    )


def _label(value: Any, where: str) -> int:
    try:
        label = int(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: the label {value!r} is not an integer class id") from None
    return label


class _DatasetReader:
    """``read(i)``: item ``i`` of a user's dataset as ``{modality: tensor}`` (picklable)."""

    def __init__(self, dataset: Dataset, where: str) -> None:
        self.dataset = dataset
        self.where = where

    def __call__(self, i: int) -> dict[str, torch.Tensor]:
        inputs, _, present = _parse_item(self.dataset[i], f"{self.where} item {i}")
        return {
            m: _tensor(x, f"{self.where} item {i} modality {m!r}")
            for m, x in inputs.items()
            if x is not None and bool(present.get(m, True))
        }


def _dataset_split(dataset: Any, where: str, num_workers: int) -> ItemSplit:
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise ValueError(
            f"{where}: an iterable dataset cannot be used; give a map-style dataset "
            "(__len__ and __getitem__) or the tensors themselves"
        )
    try:
        n = len(dataset)
    except TypeError:
        raise ValueError(f"{where}: the dataset has no length (__len__)") from None
    if n == 0:
        raise ValueError(f"{where}: the dataset is empty")
    labels = torch.empty(n, dtype=torch.long)
    present_rows: dict[str, list[bool]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for i in range(n):  # one pass: labels, presence and shapes are needed up front
        inputs, label, present = _parse_item(dataset[i], f"{where} item {i}")
        labels[i] = _label(label, f"{where} item {i}")
        for m in present_rows:
            present_rows[m].append(False)
        for m, x in inputs.items():
            here = x is not None and bool(present.get(m, True))
            if m not in present_rows:
                present_rows[m] = [False] * (i + 1)
            present_rows[m][i] = here
            if not here:
                continue
            t = _tensor(x, f"{where} item {i} modality {m!r}")
            if m not in shapes:
                shapes[m], dtypes[m] = tuple(t.shape), t.dtype
            elif tuple(t.shape) != shapes[m]:
                raise ValueError(
                    f"{where} item {i}: modality {m!r} has shape {tuple(t.shape)}, but earlier "
                    f"items have {shapes[m]}; pad to one shape per modality"
                )
    never = [m for m in present_rows if m not in shapes]
    if never:
        raise ValueError(f"{where}: modality {never[0]!r} is absent from every item")
    dtypes = {m: torch.float32 if d.is_floating_point else d for m, d in dtypes.items()}
    return ItemSplit(
        list(range(n)),
        _DatasetReader(dataset, where),
        labels,
        shapes,
        dtypes=dtypes,
        present={m: torch.tensor(v, dtype=torch.bool) for m, v in present_rows.items()},
        num_workers=num_workers,
    )


def as_split(source: Any, where: str = "split") -> FeatureSplit | ItemSplit:
    """One split from tensors, a map-style dataset or a DataLoader (see the module doc).

    ``where`` names the split in error messages. A split equimodal already made
    (:class:`FeatureSplit`, :class:`ItemSplit`) is returned as it is.
    """
    if isinstance(source, (FeatureSplit, ItemSplit)):
        return source
    if isinstance(source, DataLoader):
        if source.collate_fn is not torch.utils.data.default_collate and not getattr(
            source, "_equimodal_warned", False
        ):
            warnings.warn(
                f"{where}: the DataLoader's collate_fn is not used; equimodal stacks each "
                "modality's items itself (pad them to one shape in the dataset)",
                stacklevel=3,
            )
        return _dataset_split(source.dataset, where, source.num_workers)
    if (
        isinstance(source, (tuple, list))
        and len(source) in (2, 3)
        and isinstance(source[0], Mapping)
    ):
        inputs, labels = source[0], source[1]
        present = source[2] if len(source) == 3 else None
        features = {m: _tensor(x, f"{where} modality {m!r}") for m, x in inputs.items()}
        if not features:
            raise ValueError(f"{where}: inputs hold no modality")
        y = _tensor(labels, f"{where} labels").reshape(-1)
        if y.is_floating_point() and not bool((y == y.round()).all()):
            raise ValueError(f"{where}: labels must be integer class ids")
        n = int(y.shape[0])
        if present is not None:
            unknown = [m for m in present if m not in features]
            if unknown:
                raise ValueError(f"{where}: present names modality {unknown[0]!r} not in inputs")
            present = {
                m: _tensor(present[m], f"{where} present {m!r}").bool().reshape(-1)
                if m in present
                else torch.ones(n, dtype=torch.bool)
                for m in features
            }
        return FeatureSplit(features, y.long(), torch.arange(n), present)
    if isinstance(source, Dataset) or (
        hasattr(source, "__getitem__") and hasattr(source, "__len__")
    ):
        return _dataset_split(source, where, 0)
    raise ValueError(
        f"{where}: expected (inputs, labels[, present]) with inputs a dict of tensors, a "
        f"map-style torch Dataset or a DataLoader; got {type(source).__name__}"
    )


def _specs(splits: dict[str, Any]) -> tuple[ModalitySpec, ...]:
    first = splits["train"]
    names = list(first.modalities)
    shapes = _shapes(first)
    for name, split in splits.items():
        if set(split.modalities) != set(names):
            raise ValueError(
                f"the {name} split has modalities {sorted(split.modalities)}, the train split "
                f"{sorted(names)}; every split needs the same ones"
            )
        other = _shapes(split)
        for m in names:
            if other[m] != shapes[m]:
                raise ValueError(
                    f"modality {m!r} has shape {other[m]} in the {name} split but "
                    f"{shapes[m]} in the train split"
                )
    return tuple(ModalitySpec(m, shapes[m]) for m in names)


def _shapes(split: Any) -> dict[str, tuple[int, ...]]:
    if isinstance(split, FeatureSplit):
        return {m: tuple(x.shape[1:]) for m, x in split.features.items()}
    return dict(split.shapes)


def make_data(
    train: Any,
    val: Any,
    test: Any | None = None,
    *,
    num_classes: int | None = None,
    name: str = "custom",
    class_names: tuple[str, ...] | list[str] = (),
) -> MultimodalData:
    """Your own splits as a :class:`MultimodalData` (each a source of the module doc).

    ``val`` is the split that selects the model and schedules the balancing methods;
    ``test`` (None: none, the test metrics are left empty) is scored once at the end.
    ``num_classes`` defaults to the largest label plus one.
    """
    sources = {"train": train, "val": val, "test": test}
    splits: dict[str, Any] = {}
    for split_name in SPLIT_NAMES:
        source = sources[split_name]
        if source is None:
            continue
        splits[split_name] = as_split(source, f"the {split_name} split")
    if "test" not in splits:  # an empty test split with the train split's modalities
        splits["test"] = _empty_like(splits["train"])
    specs = _specs(splits)
    largest = max(int(s.labels.max()) for s in splits.values() if len(s))
    classes = num_classes if num_classes is not None else largest + 1
    if class_names and len(class_names) != classes:
        raise ValueError(f"{len(class_names)} class names for {classes} classes")
    info = DatasetInfo(
        name=name,
        modalities=specs,
        num_classes=classes,
        num_samples=sum(len(s) for s in splits.values()),
        source="user data (from Python)",
        license="the user's",
        class_names=tuple(class_names),
    )
    return MultimodalData(info, splits["train"], splits["val"], splits["test"])


def _empty_like(split: Any) -> FeatureSplit:
    shapes = _shapes(split)
    return FeatureSplit(
        {m: torch.zeros((0, *s)) for m, s in shapes.items()},
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
    )
