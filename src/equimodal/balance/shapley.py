"""Shapley values of modalities (players) for a coalition value function.

Coalitions are bitmasks over players ``0..M-1`` (bit ``i`` set: player ``i`` is in). The
value function is called once per distinct coalition; the model side (``equimodal.
evaluate``) makes each call cheap by reusing cached encoder features.

* :func:`exact_shapley` enumerates all ``2^M`` coalitions:
  ``phi_m = sum_{S ⊆ M minus m} |S|! (M-|S|-1)! / M! [v(S ∪ {m}) - v(S)]``.
* :func:`sampled_shapley` averages marginal contributions over random permutations, each
  followed by its reverse (antithetic pairs, our choice), and reports a standard error.
  Every permutation's contributions sum to ``v(all) - v(empty)``, so efficiency holds
  exactly for the estimate too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

ValueFn = Callable[[int], float]
MAX_PLAYERS = 20


@dataclass(frozen=True)
class ShapleyResult:
    """Shapley values with their standard errors (None when exact)."""

    values: np.ndarray
    stderr: np.ndarray | None
    v_all: float
    v_empty: float
    exact: bool
    evaluations: int

    def shares(self) -> np.ndarray:
        """Contribution shares ``max(phi, 0) / sum max(phi, 0)`` (uniform when all <= 0)."""
        pos = np.clip(self.values, 0.0, None)
        total = pos.sum()
        if total <= 0:
            return np.full(len(pos), 1.0 / len(pos))
        return pos / total


def coalition_members(mask: int, num_players: int) -> tuple[int, ...]:
    """Players in coalition ``mask``."""
    return tuple(i for i in range(num_players) if mask >> i & 1)


def all_coalitions(num_players: int) -> list[int]:
    """Every coalition of ``num_players`` players, as bitmasks ``0 .. 2^M - 1``."""
    return list(range(1 << num_players))


def _check_players(num_players: int) -> None:
    if not 1 <= num_players <= MAX_PLAYERS:
        raise ValueError(f"num_players must be between 1 and {MAX_PLAYERS}, got {num_players}")


def exact_shapley_from_table(values: np.ndarray) -> ShapleyResult:
    """Exact Shapley values from a table of coalition values indexed by bitmask."""
    values = np.asarray(values, dtype=float)
    size = values.shape[0]
    num_players = size.bit_length() - 1
    if size < 2 or 1 << num_players != size:
        raise ValueError(f"a value table must have 2^M entries, got {size}")
    masks = np.arange(size)
    sizes = np.array([bin(m).count("1") for m in masks])
    fact = [math.factorial(k) for k in range(num_players + 1)]
    total = fact[num_players]
    phi = np.zeros(num_players)
    for i in range(num_players):
        without = masks[(masks >> i & 1) == 0]
        s = sizes[without]
        weights = np.array([fact[k] * fact[num_players - k - 1] / total for k in s])
        phi[i] = float(np.dot(weights, values[without | (1 << i)] - values[without]))
    return ShapleyResult(
        values=phi,
        stderr=None,
        v_all=float(values[-1]),
        v_empty=float(values[0]),
        exact=True,
        evaluations=size,
    )


def exact_shapley(value_fn: ValueFn, num_players: int) -> ShapleyResult:
    """Exact Shapley values; ``value_fn`` is called exactly once per coalition (2^M calls)."""
    _check_players(num_players)
    table = np.array([value_fn(mask) for mask in all_coalitions(num_players)], dtype=float)
    return exact_shapley_from_table(table)


def sampled_shapley(
    value_fn: ValueFn,
    num_players: int,
    num_permutations: int,
    rng: np.random.Generator,
    antithetic: bool = True,
) -> ShapleyResult:
    """Permutation-sampling estimate with standard errors.

    With ``antithetic`` each sampled permutation is followed by its reverse and the pair's
    mean counts as one sample for the standard error. Coalition values are cached, so
    ``evaluations`` counts distinct coalitions.
    """
    _check_players(num_players)
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

    samples = []
    for _ in range(num_permutations):
        order = rng.permutation(num_players)
        contrib = contributions(order)
        if antithetic:
            contrib = 0.5 * (contrib + contributions(order[::-1]))
        samples.append(contrib)
    arr = np.array(samples)
    n = arr.shape[0]
    stderr = arr.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.full(num_players, np.inf)
    full = (1 << num_players) - 1
    return ShapleyResult(
        values=arr.mean(axis=0),
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
    """Exact Shapley values up to ``max_exact_players`` players, permutation sampling above."""
    if num_players <= max_exact_players:
        return exact_shapley(value_fn, num_players)
    return sampled_shapley(value_fn, num_players, num_permutations, np.random.default_rng(seed))
