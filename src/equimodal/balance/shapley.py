"""Shapley values of modalities (players) for a coalition value function.

Coalitions are bitmasks over players ``0..M-1`` (bit ``i`` set: player ``i`` is in). The
value function is called once per distinct coalition; the model side (``equimodal.
evaluate``) reuses cached encoder features and, knowing in advance which coalitions an
estimate will ask for (:func:`required_coalitions`), evaluates all of them in one batch.

* :func:`exact_shapley` enumerates all ``2^M`` coalitions:
  ``phi_m = sum_{S ⊆ M minus m} |S|! (M-|S|-1)! / M! [v(S ∪ {m}) - v(S)]``.
* :func:`sampled_shapley` averages marginal contributions over random permutations, each
  followed by its reverse (antithetic pairs, our choice), and reports a standard error.
  Every permutation's contributions sum to ``v(all) - v(empty)``, so efficiency holds
  exactly for the estimate too.
* :func:`shapley_values` picks exact enumeration up to ``max_exact_players`` (default 8)
  and sampling above.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

ValueFn = Callable[[int], float]
MAX_EXACT_PLAYERS = 20


@dataclass(frozen=True)
class ShapleyResult:
    """Shapley values of ``M`` players.

    ``values`` has shape ``(M,)``; ``stderr`` is the standard error of each value (``None``
    when exact); ``v_all`` / ``v_empty`` are the values of the grand and empty coalitions;
    ``evaluations`` is the number of distinct coalitions evaluated.
    """

    values: np.ndarray
    stderr: np.ndarray | None
    v_all: float
    v_empty: float
    exact: bool
    evaluations: int

    @property
    def num_players(self) -> int:
        """Number of players ``M``."""
        return int(self.values.shape[0])

    def shares(self) -> np.ndarray:
        """Contribution shares ``max(phi, 0) / sum max(phi, 0)`` (uniform when all <= 0)."""
        pos = np.clip(np.asarray(self.values, dtype=float), 0.0, None)
        total = pos.sum()
        if total <= 0:
            return np.full(pos.shape[0], 1.0 / pos.shape[0])
        return pos / total


def coalition_members(mask: int, num_players: int) -> tuple[int, ...]:
    """Players in coalition ``mask``, ascending."""
    if mask < 0 or mask >> num_players:
        raise ValueError(f"mask {mask} is not a coalition of {num_players} players")
    return tuple(i for i in range(num_players) if mask >> i & 1)


def all_coalitions(num_players: int) -> list[int]:
    """Every coalition of ``num_players`` players, as bitmasks ``0 .. 2^M - 1``."""
    if num_players < 0:
        raise ValueError(f"num_players must be non-negative, got {num_players}")
    return list(range(1 << num_players))


def _check_exact_players(num_players: int) -> None:
    if not 1 <= num_players <= MAX_EXACT_PLAYERS:
        raise ValueError(
            f"num_players must be between 1 and {MAX_EXACT_PLAYERS} for exact Shapley values, "
            f"got {num_players}"
        )


def _popcount(masks: np.ndarray, num_players: int) -> np.ndarray:
    """Number of set bits of each mask."""
    sizes = np.zeros(masks.shape, dtype=np.int64)
    for i in range(num_players):
        sizes += (masks >> i) & 1
    return sizes


def shapley_weights(num_players: int) -> np.ndarray:
    """The exact Shapley value's weight of a coalition of size ``k`` that a player joins:
    ``w[k] = k! (M-k-1)! / M! = 1 / (M * C(M-1, k))`` for ``k = 0 .. M-1``."""
    return np.array(
        [1.0 / (num_players * math.comb(num_players - 1, k)) for k in range(num_players)]
    )


def exact_shapley_from_table(values: np.ndarray) -> ShapleyResult:
    """Exact Shapley values from a table of ``2^M`` coalition values indexed by bitmask."""
    table = np.asarray(values, dtype=float)
    if table.ndim != 1:
        raise ValueError(f"a value table must be 1-D, got shape {table.shape}")
    size = table.shape[0]
    num_players = size.bit_length() - 1
    if size < 2 or 1 << num_players != size:
        raise ValueError(f"a value table must have 2^M entries (M >= 1), got {size}")
    _check_exact_players(num_players)
    masks = np.arange(size, dtype=np.int64)
    # weight |S|! (M-|S|-1)! / M! of each coalition S by its size; the grand coalition
    # (size M) never plays the role of S, so its weight is unused
    by_size = np.append(shapley_weights(num_players), 0.0)
    coalition_weight = by_size[_popcount(masks, num_players)]
    phi = np.empty(num_players)
    for i in range(num_players):
        bit = 1 << i
        without = masks[(masks & bit) == 0]  # the 2^(M-1) coalitions without player i
        gains = table[without | bit] - table[without]
        phi[i] = float(np.dot(coalition_weight[without], gains))
    return ShapleyResult(
        values=phi,
        stderr=None,
        v_all=float(table[-1]),
        v_empty=float(table[0]),
        exact=True,
        evaluations=size,
    )


def exact_shapley(value_fn: ValueFn, num_players: int) -> ShapleyResult:
    """Exact Shapley values; ``value_fn(mask)`` is called exactly once per coalition."""
    _check_exact_players(num_players)
    table = np.array([float(value_fn(mask)) for mask in all_coalitions(num_players)])
    return exact_shapley_from_table(table)


def draw_permutations(
    num_players: int, num_permutations: int, rng: np.random.Generator
) -> np.ndarray:
    """The ``(num_permutations, M)`` permutations :func:`sampled_shapley` walks (before the
    antithetic reverses), drawn from ``rng`` in the same way."""
    out = np.empty((num_permutations, num_players), dtype=np.int64)
    for k in range(num_permutations):
        out[k] = rng.permutation(num_players)
    return out


def required_coalitions(
    num_players: int,
    *,
    max_exact_players: int = 8,
    num_permutations: int = 64,
    seed: int = 0,
    antithetic: bool = True,
) -> list[int]:
    """The coalitions (bitmasks, ascending) that :func:`shapley_values` with the same
    arguments will ask the value function for.

    A caller that can evaluate many coalitions in one batch (cached features through one
    prefix tree, :meth:`equimodal.models.MultimodalModel.fuse_coalitions`) evaluates these
    first and then answers ``shapley_values`` from a table.
    """
    if num_players <= max_exact_players:
        _check_exact_players(num_players)
        return all_coalitions(num_players)
    if num_permutations < 1:
        raise ValueError(f"num_permutations must be positive, got {num_permutations}")
    masks = {0, (1 << num_players) - 1}
    for order in draw_permutations(num_players, num_permutations, np.random.default_rng(seed)):
        for walk in (order, order[::-1]) if antithetic else (order,):
            mask = 0
            for player in walk:
                mask |= 1 << int(player)
                masks.add(mask)
    return sorted(masks)


def sampled_shapley(
    value_fn: ValueFn,
    num_players: int,
    num_permutations: int,
    rng: np.random.Generator,
    antithetic: bool = True,
) -> ShapleyResult:
    """Permutation-sampling estimate of the Shapley values, with standard errors.

    ``num_permutations`` permutations are drawn from ``rng``; with ``antithetic`` each is
    followed by its reverse and the pair's mean counts as one sample for the standard error
    (so ``2 * num_permutations`` orders are walked). ``stderr`` is the sample standard
    deviation (ddof 1) of the per-sample marginal contributions over ``sqrt(n)``; it is
    ``inf`` when there is a single sample. Coalition values are cached by mask, so
    ``evaluations`` counts distinct coalitions (at most ``2^M``).
    """
    if num_players < 1:
        raise ValueError(f"num_players must be at least 1, got {num_players}")
    if num_permutations < 1:
        raise ValueError(f"num_permutations must be positive, got {num_permutations}")
    cache: dict[int, float] = {}

    def v(mask: int) -> float:
        if mask not in cache:
            cache[mask] = float(value_fn(mask))
        return cache[mask]

    def contributions(order: np.ndarray) -> np.ndarray:
        out = np.zeros(num_players)
        mask = 0
        previous = v(0)
        for player in order:
            mask |= 1 << int(player)
            current = v(mask)
            out[player] = current - previous
            previous = current
        return out

    samples = np.empty((num_permutations, num_players))
    for k, order in enumerate(draw_permutations(num_players, num_permutations, rng)):
        contrib = contributions(order)
        if antithetic:
            contrib = 0.5 * (contrib + contributions(order[::-1]))
        samples[k] = contrib
    if num_permutations > 1:
        stderr = samples.std(axis=0, ddof=1) / math.sqrt(num_permutations)
    else:
        stderr = np.full(num_players, np.inf)
    full = (1 << num_players) - 1
    return ShapleyResult(
        values=samples.mean(axis=0),
        stderr=stderr,
        v_all=v(full),
        v_empty=v(0),
        exact=False,
        evaluations=len(cache),
    )


def shapley_values(
    value_fn: ValueFn,
    num_players: int,
    *,
    max_exact_players: int = 8,
    num_permutations: int = 64,
    seed: int = 0,
) -> ShapleyResult:
    """Exact Shapley values up to ``max_exact_players`` players, permutation sampling above.

    Sampling uses antithetic pairs, ``num_permutations`` pairs and ``np.random.
    default_rng(seed)``.
    """
    if num_players <= max_exact_players:
        return exact_shapley(value_fn, num_players)
    return sampled_shapley(value_fn, num_players, num_permutations, np.random.default_rng(seed))
