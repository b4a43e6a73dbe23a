"""Modality orders: ranking for the alternating schedule and order sets for inference."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

Order = tuple[int, ...]


def all_orders(num_modalities: int) -> list[Order]:
    """All ``M!`` orders, lexicographic."""
    return list(itertools.permutations(range(num_modalities)))


def cyclic_shifts(order: Sequence[int]) -> list[Order]:
    """The M cyclic shifts of ``order``: each modality once in each position (a Latin square)."""
    order = tuple(order)
    return [order[k:] + order[:k] for k in range(len(order))]


def hybrid_order_set(
    num_modalities: int,
    base_order: Sequence[int] | None = None,
    max_orders: int = 24,
    seed: int = 0,
) -> list[Order]:
    """Orders for hybrid-order inference (METHODS §1.5).

    All ``M!`` orders while ``M! <= max_orders``; otherwise the M cyclic shifts of
    ``base_order`` (identity by default) plus distinct seeded random orders up to
    ``max_orders`` (our choice). Deterministic for a seed.
    """
    if num_modalities < 1:
        raise ValueError(f"need at least one modality, got {num_modalities}")
    if max_orders < 1:
        raise ValueError(f"max_orders must be positive, got {max_orders}")
    if math.factorial(num_modalities) <= max_orders:
        return all_orders(num_modalities)
    base = tuple(range(num_modalities)) if base_order is None else tuple(int(i) for i in base_order)
    if sorted(base) != list(range(num_modalities)):
        raise ValueError(f"base_order must be a permutation of 0..{num_modalities - 1}, got {base}")
    chosen = cyclic_shifts(base)[:max_orders]
    seen = set(chosen)
    rng = np.random.default_rng(seed)
    while len(chosen) < max_orders:
        order = tuple(int(i) for i in rng.permutation(num_modalities))
        if order not in seen:
            seen.add(order)
            chosen.append(order)
    return chosen


def order_from_scores(scores: Sequence[float] | np.ndarray) -> Order:
    """Indices by ascending score (weakest first); ties keep the lower index first."""
    scores = np.asarray(scores, dtype=float)
    return tuple(int(i) for i in np.argsort(scores, kind="stable"))
