"""Modality orders: all orders, Latin-square shifts, hybrid order sets, score ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from equimodal.balance import (
    all_orders,
    cyclic_shifts,
    exact_shapley,
    hybrid_order_set,
    order_from_scores,
)


def test_all_orders_lexicographic():
    assert all_orders(3) == [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    assert all_orders(1) == [(0,)]
    assert len(set(all_orders(4))) == 24
    with pytest.raises(ValueError):
        all_orders(0)


def test_cyclic_shifts_form_a_latin_square():
    shifts = cyclic_shifts([2, 0, 1])
    assert shifts == [(2, 0, 1), (0, 1, 2), (1, 2, 0)]
    for position in range(3):
        assert sorted(o[position] for o in shifts) == [0, 1, 2]


def test_small_m_gives_all_orders():
    assert hybrid_order_set(3) == all_orders(3)
    assert hybrid_order_set(4) == all_orders(4)  # 4! = 24 = default max_orders
    assert hybrid_order_set(2, base_order=[1, 0]) == [(0, 1), (1, 0)]
    assert len(hybrid_order_set(6, max_orders=720)) == math.factorial(6)


def test_six_modalities_latin_square_plus_sampled_orders():
    base = (5, 4, 3, 2, 1, 0)
    orders = hybrid_order_set(6, base_order=list(base), max_orders=24, seed=1)
    assert len(orders) == 24 == len(set(orders))
    assert all(sorted(o) == list(range(6)) for o in orders)
    shifts = orders[:6]
    assert shifts == cyclic_shifts(base)
    for position in range(6):
        assert sorted(o[position] for o in shifts) == list(range(6))
    # deterministic for a seed, different for another
    assert orders == hybrid_order_set(6, base_order=base, max_orders=24, seed=1)
    assert orders[6:] != hybrid_order_set(6, base_order=base, max_orders=24, seed=2)[6:]


def test_default_base_is_identity():
    orders = hybrid_order_set(5, max_orders=24)
    assert orders[:5] == cyclic_shifts(range(5))
    assert len(set(orders)) == 24


def test_fewer_orders_than_modalities_gives_first_shifts():
    assert hybrid_order_set(6, max_orders=4) == cyclic_shifts(range(6))[:4]
    assert hybrid_order_set(6, base_order=[1, 2, 3, 4, 5, 0], max_orders=1) == [(1, 2, 3, 4, 5, 0)]


def test_hybrid_order_set_refuses_bad_input():
    with pytest.raises(ValueError):
        hybrid_order_set(0)
    with pytest.raises(ValueError):
        hybrid_order_set(5, max_orders=0)
    with pytest.raises(ValueError, match="permutation"):
        hybrid_order_set(5, base_order=[0, 1, 2, 3, 3])
    with pytest.raises(ValueError, match="permutation"):
        hybrid_order_set(5, base_order=[0, 1, 2])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(1, 60), st.integers(0, 1000))
def test_hybrid_order_set_properties(m, max_orders, seed):
    orders = hybrid_order_set(m, max_orders=max_orders, seed=seed)
    assert len(orders) == min(max_orders, math.factorial(m))
    assert len(set(orders)) == len(orders)
    assert all(sorted(o) == list(range(m)) for o in orders)
    if math.factorial(m) > max_orders:
        assert orders[: min(m, max_orders)] == cyclic_shifts(range(m))[:max_orders]


def test_order_from_scores_weakest_first_ties_by_index():
    assert order_from_scores([0.3, 0.1, 0.3, 0.0]) == (3, 1, 0, 2)
    assert order_from_scores([0.2, 0.2, 0.2]) == (0, 1, 2)
    assert order_from_scores([-0.1, 0.5, -0.1, 0.5]) == (0, 2, 1, 3)
    assert order_from_scores([0.4, 0.1], names=["audio", "video"]) == (1, 0)
    assert all(isinstance(i, int) for i in order_from_scores([0.1, 0.0]))


def test_order_from_scores_ties_within_float_noise_break_by_index():
    rng = np.random.default_rng(0)
    for _ in range(200):
        # six modalities on two or three levels, each value off by up to 1e-12 of noise in
        # random positions: the levels decide, then the index, never the noise
        levels = rng.choice([0.1, 0.25, 0.4], size=6)
        noise = rng.uniform(-1e-12, 1e-12, size=6) * (rng.random(6) < 0.5)
        expected = tuple(sorted(range(6), key=lambda i: (levels[i], i)))
        assert order_from_scores(levels + noise) == expected
    # 1e-6 apart is not a tie: the value decides, whatever the index
    assert order_from_scores([0.3 + 1e-6, 0.3]) == (1, 0)
    assert order_from_scores([0.3, 0.3 - 1e-6, 0.3 + 1e-6]) == (1, 0, 2)
    assert order_from_scores([0.3 + 2e-9, 0.3]) == (1, 0)  # just above the tolerance
    assert order_from_scores([0.3 + 5e-10, 0.3]) == (0, 1)  # within it


def test_order_from_scores_symmetric_games_order_equal_players_by_index():
    # v(S) = sqrt(sum of the members' weights): players of equal weight have equal Shapley
    # values in exact arithmetic, which float rounding splits either way
    rng = np.random.default_rng(1)
    for _ in range(200):
        weights = rng.integers(1, 4, size=6).astype(float)

        def value(mask, weights=weights):
            return math.sqrt(sum(w for i, w in enumerate(weights) if mask >> i & 1))

        phi = exact_shapley(value, 6).values
        expected = tuple(sorted(range(6), key=lambda i: (weights[i], i)))
        assert order_from_scores(phi) == expected


def test_order_from_scores_refuses_bad_input():
    with pytest.raises(ValueError, match="one name per score"):
        order_from_scores([0.1, 0.2], names=["a"])
    with pytest.raises(ValueError):
        order_from_scores([0.1, float("nan")])
    with pytest.raises(ValueError):
        order_from_scores([])
    with pytest.raises(ValueError, match="tol"):
        order_from_scores([0.1, 0.2], tol=-1.0)
