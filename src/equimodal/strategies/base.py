"""Helpers that training methods share, and the names a new method needs.

A method is a :class:`Strategy` subclass in one file of this package, registered with
``@register_strategy``; the hooks it may override are documented on :class:`Strategy`
(:mod:`equimodal.engine.strategy`). The loss helpers here make batch statistics those of
the global batch under torchrun.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from equimodal.core.shard import current_shard
from equimodal.engine.strategy import Strategy, TrainContext, register_strategy


def masked_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy over the rows where ``rows`` is True (0 when there are none).

    Under torchrun the mean is over the selected rows of the global batch.
    """
    shard = current_shard()
    if shard is not None:
        return shard.masked_cross_entropy(logits, labels, rows)
    if bool(rows.all()):
        return F.cross_entropy(logits, labels)
    if not bool(rows.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[rows], labels[rows])


def any_present(
    present: Mapping[str, torch.Tensor], modalities: Iterable[str] | None = None
) -> torch.Tensor:
    """The rows that have at least one of ``modalities`` (all of ``present``'s by default)."""
    names = list(present if modalities is None else modalities)
    rows = torch.zeros_like(present[names[0]], dtype=torch.bool)
    for m in names:
        rows = rows | present[m]
    return rows


def mean_or_zero(losses: Sequence[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    """Mean of the non-None losses, or a zero tensor on ``like``'s graph."""
    kept = [loss for loss in losses if loss is not None]
    if not kept:
        return like.sum() * 0.0
    return torch.stack(kept).mean()


__all__ = [
    "Strategy",
    "TrainContext",
    "any_present",
    "masked_cross_entropy",
    "mean_or_zero",
    "register_strategy",
]
