"""Shapley values: hand-computed games, axioms on random games, sampling vs exact."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from equimodal.balance import (
    ShapleyResult,
    all_coalitions,
    coalition_members,
    exact_shapley,
    exact_shapley_from_table,
    sampled_shapley,
    shapley_values,
)


def table_fn(table):
    return lambda mask: float(table[mask])


def brute_force_shapley(table, m):
    """Shapley values as the average marginal contribution over all M! orders."""
    phi = np.zeros(m)
    for order in itertools.permutations(range(m)):
        mask = 0
        for p in order:
            phi[p] += table[mask | 1 << p] - table[mask]
            mask |= 1 << p
    return phi / math.factorial(m)


@st.composite
def games(draw, min_players=2, max_players=6):
    m = draw(st.integers(min_players, max_players))
    values = draw(
        st.lists(
            st.floats(-1, 1, allow_nan=False, allow_infinity=False),
            min_size=1 << m,
            max_size=1 << m,
        )
    )
    return m, np.array(values)


# ---------------------------------------------------------------- helpers
def test_coalition_helpers():
    assert all_coalitions(3) == list(range(8))
    assert coalition_members(0, 3) == ()
    assert coalition_members(0b101, 3) == (0, 2)
    assert coalition_members(0b111, 3) == (0, 1, 2)
    with pytest.raises(ValueError):
        coalition_members(0b1000, 3)


# ---------------------------------------------------------------- hand-computed games
def test_two_player_game_by_hand():
    # v(∅)=0.1, v({0})=0.6, v({1})=0.3, v({0,1})=0.9
    # phi0 = 1/2 (0.6-0.1) + 1/2 (0.9-0.3) = 0.25 + 0.30 = 0.55
    # phi1 = 1/2 (0.3-0.1) + 1/2 (0.9-0.6) = 0.10 + 0.15 = 0.25
    res = exact_shapley(table_fn([0.1, 0.6, 0.3, 0.9]), 2)
    np.testing.assert_allclose(res.values, [0.55, 0.25])
    assert res.v_all == pytest.approx(0.9) and res.v_empty == pytest.approx(0.1)
    assert res.exact and res.stderr is None and res.evaluations == 4
    np.testing.assert_allclose(res.shares(), [0.55 / 0.8, 0.25 / 0.8])


def test_glove_game_by_hand():
    # player 0 holds a left glove, players 1 and 2 right gloves; a matched pair is worth 1.
    # Player 0 is pivotal whenever a right glove precedes it (it is 2nd or 3rd): 4 of 6
    # orders -> 2/3. Right glove 1 is pivotal only in the order (0, 1, 2) -> 1/6; same for 2.
    def v(mask):
        return float(bool(mask & 1) and bool(mask & 0b110))

    res = exact_shapley(v, 3)
    np.testing.assert_allclose(res.values, [2 / 3, 1 / 6, 1 / 6])


def test_airport_game_by_hand():
    # runway costs (1, 2, 3), v(S) = longest runway needed by S. Shapley splits each
    # segment equally among the players that need it: 1/3, 1/3 + 1/2, 1/3 + 1/2 + 1.
    cost = [1.0, 2.0, 3.0]

    def v(mask):
        return max((cost[i] for i in coalition_members(mask, 3)), default=0.0)

    np.testing.assert_allclose(exact_shapley(v, 3).values, [1 / 3, 5 / 6, 11 / 6])


def test_simple_majority_game_is_symmetric():
    res = exact_shapley(lambda mask: float(bin(mask).count("1") >= 2), 3)
    np.testing.assert_allclose(res.values, [1 / 3] * 3)


def test_additive_game_gives_each_player_its_own_value():
    own = np.array([0.5, -0.2, 0.1, 0.7])
    res = exact_shapley(lambda mask: 0.3 + sum(own[i] for i in coalition_members(mask, 4)), 4)
    np.testing.assert_allclose(res.values, own)


def test_single_player():
    res = exact_shapley(table_fn([0.2, 0.9]), 1)
    np.testing.assert_allclose(res.values, [0.7])


def test_exact_calls_value_fn_once_per_coalition():
    calls = []

    def v(mask):
        calls.append(mask)
        return 0.0

    res = exact_shapley(v, 5)
    assert sorted(calls) == list(range(32))
    assert res.evaluations == 32


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="num_players"):
        exact_shapley(lambda m: 0.0, 0)
    with pytest.raises(ValueError, match="num_players"):
        exact_shapley(lambda m: 0.0, 21)
    with pytest.raises(ValueError, match="2\\^M"):
        exact_shapley_from_table(np.zeros(6))
    with pytest.raises(ValueError, match="2\\^M"):
        exact_shapley_from_table(np.zeros(1))
    with pytest.raises(ValueError):
        sampled_shapley(lambda m: 0.0, 3, 0, np.random.default_rng(0))


# ---------------------------------------------------------------- axioms on random games
@settings(max_examples=25, deadline=None)
@given(games())
def test_matches_brute_force_over_all_orders(game):
    m, table = game
    np.testing.assert_allclose(
        exact_shapley_from_table(table).values, brute_force_shapley(table, m), atol=1e-12
    )


@settings(max_examples=40, deadline=None)
@given(games())
def test_efficiency(game):
    m, table = game
    res = exact_shapley(table_fn(table), m)
    assert res.values.sum() == pytest.approx(table[-1] - table[0], abs=1e-9)
    assert res.v_all == table[-1] and res.v_empty == table[0]


@settings(max_examples=40, deadline=None)
@given(games(), st.data())
def test_null_player_gets_zero(game, data):
    m, table = game
    null = data.draw(st.integers(0, m - 1))
    bit = 1 << null
    for mask in range(1 << m):
        if mask & bit:
            table[mask] = table[mask & ~bit]  # v(S ∪ {null}) = v(S)
    res = exact_shapley(table_fn(table), m)
    assert res.values[null] == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(games())
def test_symmetry(game):
    m, table = game
    # make players 0 and 1 interchangeable: v(S ∪ {0}) = v(S ∪ {1}) for S without both
    for mask in range(1 << m):
        if mask & 1 and not mask & 2:
            table[mask ^ 0b11] = table[mask]
    res = exact_shapley(table_fn(table), m)
    assert res.values[0] == pytest.approx(res.values[1], abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(games(), st.floats(-3, 3, allow_nan=False))
def test_linearity(game, scale):
    m, table = game
    other = np.cos(np.arange(1 << m))
    a = exact_shapley(table_fn(table), m).values
    b = exact_shapley(table_fn(other), m).values
    c = exact_shapley(table_fn(table + scale * other), m).values
    np.testing.assert_allclose(c, a + scale * b, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(games(max_players=5), st.integers(0, 2**32 - 1), st.booleans())
def test_sampled_is_efficient_and_cached(game, seed, antithetic):
    m, table = game
    calls = []

    def v(mask):
        calls.append(mask)
        return float(table[mask])

    res = sampled_shapley(v, m, 5, np.random.default_rng(seed), antithetic=antithetic)
    assert res.values.sum() == pytest.approx(table[-1] - table[0], abs=1e-9)
    assert len(calls) == len(set(calls)) == res.evaluations <= 1 << m
    assert not res.exact and res.stderr is not None and res.stderr.shape == (m,)


# ---------------------------------------------------------------- sampling
def test_sampled_matches_exact_within_three_standard_errors():
    table = np.random.default_rng(3).uniform(0, 1, 1 << 6)
    exact = exact_shapley(table_fn(table), 6)
    est = sampled_shapley(table_fn(table), 6, 200, np.random.default_rng(0))
    assert not est.exact
    assert np.all(est.stderr > 0)
    assert np.all(np.abs(est.values - exact.values) <= 3 * est.stderr)
    assert est.values.sum() == pytest.approx(table[-1] - table[0], abs=1e-9)
    assert est.evaluations <= 1 << 6
    assert est.v_all == table[-1] and est.v_empty == table[0]


def test_sampled_is_exact_for_additive_games():
    own = np.array([0.4, 0.1, -0.3, 0.2, 0.0, 0.6, 0.05])
    res = sampled_shapley(
        lambda mask: sum(own[i] for i in coalition_members(mask, 7)),
        7,
        10,
        np.random.default_rng(1),
    )
    np.testing.assert_allclose(res.values, own, atol=1e-12)
    np.testing.assert_allclose(res.stderr, 0.0, atol=1e-12)


def test_antithetic_pair_is_exact_for_two_players():
    # for M = 2 a permutation and its reverse are all the orders
    res = sampled_shapley(table_fn([0.1, 0.6, 0.3, 0.9]), 2, 3, np.random.default_rng(0))
    np.testing.assert_allclose(res.values, [0.55, 0.25])


def test_single_sample_has_infinite_stderr():
    res = sampled_shapley(table_fn(np.arange(8.0)), 3, 1, np.random.default_rng(0))
    assert np.all(np.isinf(res.stderr))


def test_sampled_is_deterministic_for_a_seed():
    table = np.random.default_rng(5).normal(size=1 << 5)
    a = sampled_shapley(table_fn(table), 5, 7, np.random.default_rng(11))
    b = sampled_shapley(table_fn(table), 5, 7, np.random.default_rng(11))
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.stderr, b.stderr)


def test_shapley_values_switches_to_sampling_above_the_limit():
    table = np.random.default_rng(2).uniform(size=1 << 4)
    exact = shapley_values(table_fn(table), 4, max_exact_players=4)
    assert isinstance(exact, ShapleyResult) and exact.exact and exact.stderr is None
    res = shapley_values(table_fn(table), 4, max_exact_players=3, num_permutations=8, seed=4)
    assert not res.exact and res.stderr is not None
    again = shapley_values(table_fn(table), 4, max_exact_players=3, num_permutations=8, seed=4)
    np.testing.assert_array_equal(res.values, again.values)


def test_shares_clip_negative_values_and_fall_back_to_uniform():
    res = exact_shapley(table_fn([0.0, 0.5, -0.5, 0.0]), 2)  # phi = (0.5, -0.5)
    np.testing.assert_allclose(res.values, [0.5, -0.5])
    np.testing.assert_allclose(res.shares(), [1.0, 0.0])
    flat = exact_shapley(table_fn([0.3, 0.3, 0.3, 0.3]), 2)
    np.testing.assert_allclose(flat.shares(), [0.5, 0.5])
