"""Dataset descriptions and in-memory splits shared by every loader."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from equimodal.data.batch import MultimodalBatch

SPLIT_NAMES = ("train", "val", "test")
#: ``ModalitySpec.kind`` of text: UTF-8 bytes, shape ``(max_text_bytes,)`` (see
#: :mod:`equimodal.data.text`)
TEXT_KIND = "text"
#: ``ModalitySpec.kind`` of feature sequences: shape ``(T, d + 1)``, the last column 1.0 on
#: real steps and 0.0 on padding (:mod:`equimodal.models.sequence`)
SEQUENCE_KIND = "sequence"


@dataclass(frozen=True)
class ModalitySpec:
    """One modality: its name, the shape of one sample, and what kind of data it is."""

    name: str
    shape: tuple[int, ...]
    kind: str = "features"

    @property
    def dim(self) -> int:
        """Flat size of one sample (the feature dimension for vector modalities)."""
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset, as listed by ``equimodal datasets``."""

    name: str
    modalities: tuple[ModalitySpec, ...]
    num_classes: int
    num_samples: int
    source: str
    license: str
    description: str = ""
    class_names: tuple[str, ...] = ()

    @property
    def modality_names(self) -> tuple[str, ...]:
        """The modalities' names, in order."""
        return tuple(m.name for m in self.modalities)


def batch_order(
    n: int,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool,
) -> torch.Tensor:
    """The row order of one pass over ``n`` samples, cut to whole batches with ``drop_last``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return order[:stop]


def count_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches one pass over ``n`` samples yields."""
    if drop_last and n >= batch_size:
        return n // batch_size
    return (n + batch_size - 1) // batch_size


def check_some_modality(present: dict[str, torch.Tensor], indices: torch.Tensor) -> None:
    """ValueError naming the first sample whose every modality is absent."""
    if not present:
        return
    stacked = torch.stack([p.bool() for p in present.values()], 1)
    empty = ~stacked.any(1)
    if bool(empty.any()):
        first = int(empty.nonzero()[0, 0])
        raise ValueError(
            f"sample {int(indices[first])} has no modality at all (all of "
            f"{', '.join(present)} are absent); {int(empty.sum())} such samples in total"
        )


def check_labels(split, num_classes: int, where: str) -> None:
    """ValueError naming the first sample of ``split`` whose label is not in ``0..C-1``.

    ``where`` names the dataset and split in the message. A label outside the class range
    would otherwise surface as an index error deep inside the loss.
    """
    labels = split.labels
    if labels.numel() == 0 or num_classes <= 0:
        return
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{where}: sample {int(split.indices[first])} has label {int(labels[first])}, "
            f"outside the {num_classes} classes 0..{num_classes - 1} "
            f"({int(bad.sum())} such labels)"
        )


class FeatureSplit:
    """One split of a dataset held in memory as tensors (vector features per modality).

    ``features[m]`` is ``(n, d_m)`` float32, ``present[m]`` a ``(n,)`` bool mask,
    ``labels`` ``(n,)`` int64 and ``indices`` the ``(n,)`` row ids in the full dataset.
    Batches are sliced directly from the tensors, which on small tabular data is an
    order of magnitude faster than a per-item DataLoader.
    """

    def __init__(
        self,
        features: dict[str, torch.Tensor],
        labels: torch.Tensor,
        indices: torch.Tensor,
        present: dict[str, torch.Tensor] | None = None,
    ) -> None:
        n = int(labels.shape[0])
        for m, x in features.items():
            if int(x.shape[0]) != n:
                raise ValueError(f"modality {m!r} has {x.shape[0]} rows but there are {n} labels")
        self.features = {m: x.float().contiguous() for m, x in features.items()}
        self.labels = labels.long()
        self.indices = indices.long()
        if present is None:
            present = {m: torch.ones(n, dtype=torch.bool) for m in features}
        self.present = {m: present[m].bool() for m in features}
        check_some_modality(self.present, self.indices)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities' names, in order."""
        return tuple(self.features)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[MultimodalBatch]:
        """Iterate over mini-batches; ``shuffle`` draws the order from ``generator``."""
        order = batch_order(len(self), batch_size, shuffle, generator, drop_last)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            yield MultimodalBatch(
                inputs={m: x[rows] for m, x in self.features.items()},
                present={m: p[rows] for m, p in self.present.items()},
                labels=self.labels[rows],
                indices=self.indices[rows],
            )

    def batches_of(self, row_sets: Sequence[torch.Tensor]) -> Iterator[MultimodalBatch]:
        """One batch per tensor of row numbers in ``row_sets`` (multi-process shards)."""
        for r in row_sets:
            yield MultimodalBatch(
                inputs={m: x[r] for m, x in self.features.items()},
                present={m: p[r] for m, p in self.present.items()},
                labels=self.labels[r],
                indices=self.indices[r],
            )

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """How many batches ``batches(batch_size, drop_last=...)`` yields."""
        return count_batches(len(self), batch_size, drop_last)


@dataclass
class MultimodalData:
    """A loaded dataset with its train / validation / test splits."""

    info: DatasetInfo
    train: FeatureSplit
    val: FeatureSplit
    test: FeatureSplit
    options: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SPLIT_NAMES:
            check_labels(self.split(name), self.info.num_classes, f"{self.info.name} {name}")

    @property
    def modalities(self) -> tuple[str, ...]:
        """The dataset's modality names, in order."""
        return self.info.modality_names

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return self.info.num_classes

    def split(self, name: str) -> FeatureSplit:
        """The split called ``name`` (``train``, ``val`` or ``test``)."""
        if name not in SPLIT_NAMES:
            raise KeyError(f"unknown split {name!r}; choose one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)
