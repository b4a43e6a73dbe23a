"""MultimodalBatch: the one batch type that flows from datasets to models and strategies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass
class MultimodalBatch:
    """A mini-batch of several modalities.

    ``inputs[m]`` holds the tensor of modality ``m`` for every sample (rows of absent
    samples are zeros and must not be read); ``present[m]`` is a boolean mask of shape
    ``(B,)`` saying which samples have modality ``m``; ``labels`` are class ids and
    ``indices`` the row ids of the samples in their dataset.
    """

    inputs: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def modalities(self) -> tuple[str, ...]:
        """Names of the modalities carried by this batch, in dataset order."""
        return tuple(self.inputs)

    def to(self, device: torch.device | str) -> MultimodalBatch:
        """Move every tensor to ``device`` (non-blocking where possible)."""
        return MultimodalBatch(
            inputs={m: x.to(device, non_blocking=True) for m, x in self.inputs.items()},
            present={m: p.to(device, non_blocking=True) for m, p in self.present.items()},
            labels=self.labels.to(device, non_blocking=True),
            indices=self.indices.to(device, non_blocking=True),
        )

    def select(self, rows: torch.Tensor) -> MultimodalBatch:
        """The sub-batch of the given rows (an index or boolean tensor)."""
        return MultimodalBatch(
            inputs={m: x[rows] for m, x in self.inputs.items()},
            present={m: p[rows] for m, p in self.present.items()},
            labels=self.labels[rows],
            indices=self.indices[rows],
        )

    def restrict(self, modalities: Sequence[str]) -> MultimodalBatch:
        """The same samples with only the named modalities."""
        unknown = [m for m in modalities if m not in self.inputs]
        if unknown:
            raise KeyError(f"unknown modality {unknown[0]!r}; batch has {list(self.inputs)}")
        return MultimodalBatch(
            inputs={m: self.inputs[m] for m in modalities},
            present={m: self.present[m] for m in modalities},
            labels=self.labels,
            indices=self.indices,
        )


def collate_items(
    items: Sequence[Mapping[str, object]], modalities: Sequence[str]
) -> MultimodalBatch:
    """Collate dataset items ``{modality: tensor, "label": int, "index": int}`` into a batch.

    A modality absent from an item (key missing or ``None``) is zero-filled in ``inputs``
    and marked ``False`` in ``present``.
    """
    if not items:
        raise ValueError("cannot collate an empty list of items")
    inputs: dict[str, torch.Tensor] = {}
    present: dict[str, torch.Tensor] = {}
    for m in modalities:
        tensors = [item.get(m) for item in items]
        template = next((t for t in tensors if t is not None), None)
        if template is None:
            raise ValueError(f"modality {m!r} is absent for every sample of the batch")
        template = torch.as_tensor(template)
        stacked = [
            torch.as_tensor(t) if t is not None else torch.zeros_like(template) for t in tensors
        ]
        inputs[m] = torch.stack(stacked)
        present[m] = torch.tensor([t is not None for t in tensors], dtype=torch.bool)
    labels = torch.tensor([int(item["label"]) for item in items], dtype=torch.long)
    indices = torch.tensor([int(item["index"]) for item in items], dtype=torch.long)
    return MultimodalBatch(inputs=inputs, present=present, labels=labels, indices=indices)
