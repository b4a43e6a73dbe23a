"""Random missing modalities: drop (sample, modality) pairs from presence masks.

Used for training on incomplete data (``train.missing_rate``) and for the robustness
protocol (CPM-Nets style random missing rates) alike.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def drop_modalities(
    present: Mapping[str, torch.Tensor], eta: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Present masks with each present (sample, modality) dropped with probability ``eta``;
    a sample left with none keeps one of its present modalities, chosen at random."""
    if not 0.0 <= eta < 1.0:
        raise ValueError(f"missing rate must be in [0, 1), got {eta}")
    names = list(present)
    before = torch.stack([present[m].cpu() for m in names], 1)  # (N, M)
    drop = torch.rand(before.shape, generator=generator) < eta
    after = before & ~drop
    lost = ~after.any(1) & before.any(1)
    if bool(lost.any()):
        scores = torch.rand(before.shape, generator=generator) * before  # only present ones
        keep = scores[lost].argmax(1)
        after[lost.nonzero(as_tuple=True)[0], keep] = True
    device = present[names[0]].device
    return {m: after[:, i].to(device) for i, m in enumerate(names)}
