"""MultimodalBatch: the one batch type that flows from datasets to models and strategies."""

from __future__ import annotations

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
