"""Shapley values, EDM and orders: hand-computed games and properties."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from equimodal.balance import (
    all_orders,
    cyclic_shifts,
    edm,
    exact_shapley,
    exact_shapley_from_table,
    hybrid_order_set,
    minor_modalities,
    order_from_scores,
    relative_edm,
    sampled_shapley,
    shapley_values,
)


def table_fn(table):
    return lambda mask: table[mask]


# ---------------------------------------------------------------- hand-computed games
def test_two_player_game_by_hand():
    # v(∅)=0.1, v({0})=0.6, v({1})=0.3, v({0,1})=0.9
    res = exact_shapley(table_fn([0.1, 0.6, 0.3, 0.9]), 2)
    # phi0 = 1/2 (0.6-0.1) + 1/2 (0.9-0.3) = 0.55 ; phi1 = 1/2 (0.3-0.1) + 1/2 (0.9-0.6) = 0.25
    np.testing.assert_allclose(res.values, [0.55, 0.25])
    assert res.v_all == 0.9 and res.v_empty == 0.1 and res.exact and res.stderr is None


def test_glove_game_by_hand():
    # player 0 holds a left glove, players 1 and 2 right gloves; a pair is worth 1.
    def v(mask):
        return float(bool(mask & 1) and bool(mask & 6))

    res = exact_shapley(v, 3)
    np.testing.assert_allclose(res.values, [2 / 3, 1 / 6, 1 / 6])


def test_majority_game_by_hand():
    # 3 players, a coalition of at least 2 wins: symmetric, each gets 1/3.
    res = exact_shapley(lambda m: float(bin(m).count("1") >= 2), 3)
    np.testing.assert_allclose(res.values, [1 / 3] * 3)


def test_exact_calls_value_fn_once_per_coalition():
    calls = []
    exact_shapley(lambda m: calls.append(m) or 0.0, 5)
    assert sorted(calls) == list(range(32))


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="num_players"):
        exact_shapley(lambda m: 0.0, 0)
    with pytest.raises(ValueError, match="2\\^M"):
        exact_shapley_from_table(np.zeros(6))


# ---------------------------------------------------------------- properties
@st.composite
def games(draw, min_players=2, max_players=6):
    m = draw(st.integers(min_players, max_players))
    values = draw(st.lists(st.floats(-1, 1, allow_nan=False), min_size=1 << m, max_size=1 << m))
    return m, np.array(values)


@settings(max_examples=40, deadline=None)
@given(games())
def test_efficiency(game):
    m, table = game
    res = exact_shapley(table_fn(table), m)
    assert res.values.sum() == pytest.approx(table[-1] - table[0], abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(games(min_players=3))
def test_null_player_gets_zero(game):
    m, table = game
    # make player 1 a null player: v(S ∪ {1}) = v(S)
    for mask in range(1 << m):
        if mask & 2:
            table[mask] = table[mask & ~2]
    res = exact_shapley(table_fn(table), m)
    assert res.values[1] == pytest.approx(0.0, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(games(min_players=2))
def test_symmetry(game):
    m, table = game
    # make players 0 and 1 interchangeable: v(S ∪ {0}) = v(S ∪ {1}) for S without both
    for mask in range(1 << m):
        if mask & 1 and not mask & 2:
            table[mask ^ 3] = table[mask]
    res = exact_shapley(table_fn(table), m)
    assert res.values[0] == pytest.approx(res.values[1], abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(games(), st.floats(-3, 3, allow_nan=False))
def test_linearity(game, scale):
    m, table = game
    other = np.cos(np.arange(1 << m))
    a = exact_shapley(table_fn(table), m).values
    b = exact_shapley(table_fn(other), m).values
    c = exact_shapley(table_fn(table + scale * other), m).values
    np.testing.assert_allclose(c, a + scale * b, atol=1e-9)


def test_sampled_matches_exact_within_three_standard_errors():
    rng = np.random.default_rng(3)
    table = rng.uniform(0, 1, 1 << 6)
    exact = exact_shapley(table_fn(table), 6)
    est = sampled_shapley(table_fn(table), 6, 200, np.random.default_rng(0))
    assert not est.exact
    assert np.all(np.abs(est.values - exact.values) <= 3 * est.stderr + 1e-12)
    assert est.values.sum() == pytest.approx(table[-1] - table[0], abs=1e-9)
    assert est.evaluations <= 64


def test_shapley_values_switches_to_sampling_above_the_limit():
    table = np.arange(1 << 4, dtype=float)
    assert shapley_values(table_fn(table), 4, max_exact_players=4).exact
    res = shapley_values(table_fn(table), 4, max_exact_players=3, num_permutations=8)
    assert not res.exact and res.stderr is not None


# ---------------------------------------------------------------- EDM
def test_edm_equal_shares_is_zero_and_single_contributor_is_one():
    assert edm([0.2, 0.2, 0.2]).edm == pytest.approx(0.0)
    assert edm([0.5, 0.0, 0.0]).edm == pytest.approx(1.0)
    assert edm([0.5, -0.1, 0.0]).edm == pytest.approx(1.0)  # negative values are clipped


def test_edm_by_hand_and_minor_modalities():
    res = edm([0.6, 0.3, 0.1])  # shares 0.6, 0.3, 0.1 ; deviations .267, -.033, -.233
    assert res.edm == pytest.approx(3 / 4 * (0.6 - 1 / 3 + 1 / 3 - 0.3 + 1 / 3 - 0.1))
    assert res.percent == pytest.approx(100 * res.edm)
    assert minor_modalities(res, ["a", "b", "c"]) == ["c", "b"]


def test_edm_of_no_positive_contribution_is_zero():
    assert edm([0.0, -0.2]).edm == 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1, 1, allow_nan=False), min_size=2, max_size=8), st.randoms())
def test_edm_in_unit_interval_and_order_invariant(phi, rnd):
    value = edm(phi).edm
    assert 0.0 <= value <= 1.0
    shuffled = list(phi)
    rnd.shuffle(shuffled)
    assert edm(shuffled).edm == pytest.approx(value, abs=1e-12)


def test_relative_edm_zero_when_shares_follow_capabilities():
    res = relative_edm([0.3, 0.1], standalone_accuracy=[0.85, 0.45], chance=0.25)
    assert res.edm == pytest.approx(0.0)
    assert relative_edm([0.3, 0.0], [0.45, 0.45], 0.25).edm == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one stand-alone accuracy per modality"):
        relative_edm([0.1, 0.2], [0.5], 0.1)


# ---------------------------------------------------------------- orders
def test_all_orders_for_three_modalities():
    assert len(all_orders(3)) == 6 == len(set(all_orders(3)))
    assert hybrid_order_set(3) == all_orders(3)


def test_latin_square_plus_sampled_orders_for_six():
    orders = hybrid_order_set(6, base_order=[5, 4, 3, 2, 1, 0], max_orders=24, seed=1)
    assert len(orders) == 24 == len(set(orders))
    shifts = orders[:6]
    assert shifts == cyclic_shifts((5, 4, 3, 2, 1, 0))
    for position in range(6):
        assert sorted(o[position] for o in shifts) == list(range(6))
    assert orders == hybrid_order_set(6, base_order=[5, 4, 3, 2, 1, 0], max_orders=24, seed=1)
    assert hybrid_order_set(6, max_orders=4) == cyclic_shifts(range(6))[:4]
    assert len(hybrid_order_set(6, max_orders=720)) == math.factorial(6)


def test_order_from_scores_weakest_first_ties_by_index():
    assert order_from_scores([0.3, 0.1, 0.3, 0.0]) == (3, 1, 0, 2)
    assert all(len(set(o)) == 4 for o in itertools.islice(all_orders(4), 5))
