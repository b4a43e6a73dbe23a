"""Modality orders: ranking for the alternating schedule and order sets for
hybrid-order inference.

An order is a tuple of modality indices ``0..M-1``, first-read modality first.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

Order = tuple[int, ...]


def _check_permutation(order: Sequence[int], num_modalities: int) -> Order:
    out = tuple(int(i) for i in order)
    if sorted(out) != list(range(num_modalities)):
        raise ValueError(f"an order must be a permutation of 0..{num_modalities - 1}, got {out}")
    return out


def all_orders(num_modalities: int) -> list[Order]:
    """All ``M!`` orders of ``0..M-1``, lexicographic."""
    if num_modalities < 1:
        raise ValueError(f"need at least one modality, got {num_modalities}")
    return list(itertools.permutations(range(num_modalities)))


def cyclic_shifts(order: Sequence[int]) -> list[Order]:
    """The M cyclic shifts of ``order`` (shift 0 first): each modality once in each position,
    i.e. the rows of a Latin square."""
    order = tuple(int(i) for i in order)
    return [order[k:] + order[:k] for k in range(len(order))]


def hybrid_order_set(
    num_modalities: int,
    base_order: Sequence[int] | None = None,
    max_orders: int = 24,
    seed: int = 0,
) -> list[Order]:
    """Orders for hybrid-order inference.

    All ``M!`` orders (lexicographic) while ``M! <= max_orders``. Otherwise [our choice]:
    the M cyclic shifts of ``base_order`` (identity by default) followed by distinct random
    orders drawn with ``np.random.default_rng(seed)`` up to ``max_orders`` in total; when
    ``max_orders < M`` only the first ``max_orders`` shifts. Never repeats an order;
    deterministic for a seed.
    """
    if num_modalities < 1:
        raise ValueError(f"need at least one modality, got {num_modalities}")
    if max_orders < 1:
        raise ValueError(f"max_orders must be positive, got {max_orders}")
    base = (
        tuple(range(num_modalities))
        if base_order is None
        else _check_permutation(base_order, num_modalities)
    )
    if math.factorial(num_modalities) <= max_orders:
        return all_orders(num_modalities)
    chosen = cyclic_shifts(base)[:max_orders]
    seen = set(chosen)
    rng = np.random.default_rng(seed)
    # M! > max_orders here, so enough distinct orders exist and the loop ends
    while len(chosen) < max_orders:
        order = tuple(int(i) for i in rng.permutation(num_modalities))
        if order not in seen:
            seen.add(order)
            chosen.append(order)
    return chosen


#: scores closer than this (absolute) are a tie: float rounding decides nothing
TIE_TOLERANCE = 1e-9


def order_from_scores(
    scores: Sequence[float] | np.ndarray,
    names: Sequence[str] | None = None,
    tol: float = TIE_TOLERANCE,
) -> Order:
    """Modality indices by ascending score (weakest first); ties keep the lower index first.

    Scores within ``tol`` of each other are a tie, so that float rounding (the last bits
    of two Shapley values that are equal in exact arithmetic) never decides the order:
    walking the scores in ascending order, a score within ``tol`` of the lowest score of
    the current group joins it, and each group is ordered by index. ``names``, when given,
    must have one entry per score (checked only; the result is always indices). Scores
    must be finite.
    """
    values = np.asarray(scores, dtype=float)
    if values.ndim != 1 or values.size < 1:
        raise ValueError(f"need a 1-D array of scores, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("scores must be finite")
    if names is not None and len(names) != values.size:
        raise ValueError(f"need one name per score: got {len(names)} for {values.size}")
    if not tol >= 0.0:
        raise ValueError(f"tol must be non-negative, got {tol}")
    ranked: list[int] = []
    group: list[int] = []
    start = 0.0
    for i in (int(j) for j in np.argsort(values, kind="stable")):
        if group and values[i] - start > tol:
            ranked.extend(sorted(group))
            group = []
        if not group:
            start = float(values[i])
        group.append(i)
    ranked.extend(sorted(group))
    return tuple(ranked)
