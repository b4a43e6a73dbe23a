"""Property-based tests of the balance measurements (issue 7, part 4).

Shapley values (METHODS §1.4) on random coalition games of 1 to 6 players satisfy the
four axioms that define them: efficiency, symmetry, null player and linearity; the
permutation-sampling estimator is efficient exactly, whatever it samples. EDM (METHODS
§1.6: ``M / (2 (M-1)) * sum_m |p_m - 1/M|`` over the contribution shares ``p``) lies in
[0, 1], is 0 for equal shares and 1 for a single contributor, and does not depend on the
order of the modalities.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from equimodal.balance import exact_shapley, exact_shapley_from_table, sampled_shapley
from equimodal.balance.edm import contribution_shares, edm
from equimodal.balance.shapley import shapley_values

FAST = settings(max_examples=60, deadline=None)
values = st.floats(-10, 10, allow_nan=False, allow_infinity=False, allow_subnormal=False)
#: zero or at least 1e-6 in size: scaling by 1e-3 neither underflows nor loses precision
moderate = st.one_of(st.just(0.0), st.floats(1e-6, 10), st.floats(-10, -1e-6))


@st.composite
def games(draw, min_players: int = 1, max_players: int = 6) -> tuple[int, np.ndarray]:
    """``(M, table)``: a game of M players as its 2^M coalition values, by bitmask."""
    m = draw(st.integers(min_players, max_players))
    table = draw(st.lists(values, min_size=1 << m, max_size=1 << m))
    return m, np.array(table)


def phi(table: np.ndarray, m: int) -> np.ndarray:
    """Exact Shapley values through the value-function interface."""
    return exact_shapley(lambda mask: float(table[mask]), m).values


def tolerance(*tables: np.ndarray) -> float:
    return 1e-9 * (1.0 + max(float(np.abs(t).max()) for t in tables))


# --------------------------------------------------------------------------- Shapley
@FAST
@given(games())
def test_efficiency(game):
    m, table = game
    total = table[-1] - table[0]  # v(all) - v(empty)
    assert phi(table, m).sum() == pytest.approx(total, abs=tolerance(table))
    assert exact_shapley_from_table(table).values.sum() == pytest.approx(
        total, abs=tolerance(table)
    )


@FAST
@given(games(min_players=2), st.data())
def test_symmetry(game, data):
    m, table = game
    i, j = data.draw(st.lists(st.integers(0, m - 1), min_size=2, max_size=2, unique=True))
    bi, bj = 1 << i, 1 << j
    for mask in range(1 << m):  # v(S ∪ {i}) = v(S ∪ {j}) for every S holding neither
        if mask & bi and not mask & bj:
            table[mask ^ bi ^ bj] = table[mask]
    values_ = phi(table, m)
    assert values_[i] == pytest.approx(values_[j], abs=tolerance(table))


@FAST
@given(games(), st.data())
def test_null_player(game, data):
    m, table = game
    k = data.draw(st.integers(0, m - 1))
    bit = 1 << k
    for mask in range(1 << m):  # v(S ∪ {k}) = v(S): k adds nothing anywhere
        if mask & bit:
            table[mask] = table[mask ^ bit]
    assert phi(table, m)[k] == pytest.approx(0.0, abs=tolerance(table))


@FAST
@given(games(), st.data(), values, values)
def test_linearity(game, data, a, b):
    m, v = game
    w = np.array(data.draw(st.lists(values, min_size=1 << m, max_size=1 << m)))
    combined = phi(a * v + b * w, m)
    expected = a * phi(v, m) + b * phi(w, m)
    np.testing.assert_allclose(combined, expected, rtol=0, atol=100 * tolerance(v, w))


@FAST
@given(games(), st.integers(1, 12), st.integers(0, 2**32 - 1), st.booleans())
def test_sampled_estimate_is_efficient_exactly(game, permutations, seed, antithetic):
    m, table = game
    result = sampled_shapley(
        lambda mask: float(table[mask]),
        m,
        permutations,
        np.random.default_rng(seed),
        antithetic=antithetic,
    )
    assert not result.exact
    assert result.values.sum() == pytest.approx(table[-1] - table[0], abs=tolerance(table))


@settings(max_examples=20, deadline=None)
@given(games(min_players=3), st.integers(0, 1000))
def test_shapley_values_above_the_exact_limit_is_efficient(game, seed):
    m, table = game
    result = shapley_values(
        lambda mask: float(table[mask]), m, max_exact_players=2, num_permutations=3, seed=seed
    )
    assert not result.exact
    assert result.values.sum() == pytest.approx(table[-1] - table[0], abs=tolerance(table))


# --------------------------------------------------------------------------- EDM
contributions = st.lists(values, min_size=2, max_size=8)


@FAST
@given(contributions)
def test_edm_in_unit_interval_and_matches_its_formula(phis):
    result = edm(phis)
    assert 0.0 <= result.edm <= 1.0
    m = len(phis)
    p = contribution_shares(phis)
    assert p.sum() == pytest.approx(1.0) and (p >= 0).all()
    formula = m / (2 * (m - 1)) * np.abs(p - 1.0 / m).sum()
    assert result.edm == pytest.approx(min(formula, 1.0), abs=1e-12)


@FAST
@given(st.integers(2, 8), st.floats(1e-6, 1e6))
def test_edm_is_zero_for_equal_shares(m, value):
    assert edm([value] * m).edm == pytest.approx(0.0, abs=1e-12)


@FAST
@given(st.lists(st.floats(-10, 0), min_size=2, max_size=8))
def test_edm_is_zero_when_no_modality_contributes(phis):
    # no positive contribution: the shares fall back to uniform
    assert edm(phis).edm == 0.0


@FAST
@given(st.lists(st.floats(-10, 0), min_size=1, max_size=7), st.floats(1e-6, 10), st.data())
def test_edm_is_one_for_a_single_contributor(others, positive, data):
    where = data.draw(st.integers(0, len(others)))
    phis = [*others[:where], positive, *others[where:]]
    assert edm(phis).edm == pytest.approx(1.0, abs=1e-12)


@FAST
@given(contributions, st.data())
def test_edm_is_invariant_to_the_order_of_modalities(phis, data):
    order = data.draw(st.permutations(range(len(phis))))
    before, after = edm(phis), edm([phis[i] for i in order])
    assert after.edm == pytest.approx(before.edm, abs=1e-12)
    np.testing.assert_allclose(after.shares, before.shares[list(order)], atol=1e-12)
    np.testing.assert_allclose(after.deviations, before.deviations[list(order)], atol=1e-12)


@FAST
@given(st.lists(moderate, min_size=2, max_size=8), st.floats(1e-3, 1e3))
def test_edm_does_not_depend_on_the_scale_of_the_values(phis, scale):
    assert edm([scale * x for x in phis]).edm == pytest.approx(edm(phis).edm, abs=1e-9)
