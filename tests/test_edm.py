"""EDM and relative EDM: hand-computed values and properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from equimodal.balance import EDMResult, contribution_shares, edm, minor_modalities, relative_edm

finite = st.floats(-1, 1, allow_nan=False, allow_infinity=False)


def test_equal_shares_give_zero():
    res = edm([0.2, 0.2, 0.2])
    assert isinstance(res, EDMResult)
    assert res.edm == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(res.shares, [1 / 3] * 3)
    np.testing.assert_allclose(res.reference, [1 / 3] * 3)
    assert minor_modalities(res, ["a", "b", "c"]) == []


@pytest.mark.parametrize("m", [2, 3, 5, 8])
def test_single_contributor_gives_one(m):
    phi = np.zeros(m)
    phi[m - 1] = 0.4
    res = edm(phi)
    assert res.edm == pytest.approx(1.0)
    assert res.percent == pytest.approx(100.0)


def test_negative_values_are_clipped():
    res = edm([0.5, -0.1, 0.0])
    np.testing.assert_allclose(res.shares, [1.0, 0.0, 0.0])
    assert res.edm == pytest.approx(1.0)
    assert edm([0.3, -0.3, 0.3]).edm == pytest.approx(edm([0.3, 0.0, 0.3]).edm)


def test_no_positive_contribution_gives_uniform_shares_and_zero():
    res = edm([0.0, -0.2])
    np.testing.assert_allclose(res.shares, [0.5, 0.5])
    assert res.edm == 0.0


def test_edm_by_hand_and_minor_modalities():
    # shares 0.6, 0.3, 0.1; deviations 0.6-1/3, 0.3-1/3, 0.1-1/3 = 4/15, -1/30, -7/30
    # sum |d| = 16/30; EDM = 3/4 * 16/30 = 0.4
    res = edm([0.6, 0.3, 0.1])
    np.testing.assert_allclose(res.deviations, [4 / 15, -1 / 30, -7 / 30])
    assert res.edm == pytest.approx(0.4)
    assert res.percent == pytest.approx(40.0)
    assert minor_modalities(res, ["a", "b", "c"]) == ["c", "b"]
    # scale of phi does not matter
    assert edm([6.0, 3.0, 1.0]).edm == pytest.approx(0.4)


def test_two_modalities_by_hand():
    # shares 0.75, 0.25; EDM = 2/2 * (0.25 + 0.25) = 0.5
    assert edm([0.3, 0.1]).edm == pytest.approx(0.5)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        edm([0.5])
    with pytest.raises(ValueError):
        edm([[0.1, 0.2]])
    with pytest.raises(ValueError):
        edm([0.1, float("nan")])
    with pytest.raises(ValueError, match="one name per modality"):
        minor_modalities(edm([0.1, 0.2]), ["a"])


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=2, max_size=8), st.randoms(use_true_random=False))
def test_in_unit_interval_and_invariant_to_permutation(phi, rnd):
    res = edm(phi)
    assert 0.0 <= res.edm <= 1.0
    assert res.shares.sum() == pytest.approx(1.0)
    assert res.deviations.sum() == pytest.approx(0.0, abs=1e-12)
    perm = list(range(len(phi)))
    rnd.shuffle(perm)
    shuffled = edm([phi[i] for i in perm])
    assert shuffled.edm == pytest.approx(res.edm, abs=1e-12)
    np.testing.assert_allclose(shuffled.deviations, res.deviations[perm], atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(finite, min_size=2, max_size=8))
def test_plain_edm_is_scaled_total_variation(phi):
    m = len(phi)
    p = contribution_shares(phi)
    tv = 0.5 * np.abs(p - 1 / m).sum()
    assert edm(phi).edm == pytest.approx(m / (m - 1) * tv, abs=1e-12)
    # relative EDM with equal capabilities is the unscaled TV distance
    assert relative_edm(phi, [0.8] * m, chance=0.1).edm == pytest.approx(tv, abs=1e-12)


# ---------------------------------------------------------------- relative EDM
def test_relative_edm_zero_when_shares_follow_capabilities():
    # capabilities above chance 0.6 and 0.2 -> q = (0.75, 0.25); phi (0.3, 0.1) -> same p
    res = relative_edm([0.3, 0.1], standalone_accuracy=[0.85, 0.45], chance=0.25)
    assert res.edm == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(res.reference, [0.75, 0.25])
    assert minor_modalities(res, ["a", "b"]) == []


def test_relative_edm_by_hand():
    # p = (1, 0), q = (0.5, 0.5): TV = 1/2 (0.5 + 0.5) = 0.5
    res = relative_edm([0.3, 0.0], [0.45, 0.45], 0.25)
    assert res.edm == pytest.approx(0.5)
    np.testing.assert_allclose(res.deviations, [0.5, -0.5])
    assert minor_modalities(res, ["a", "b"]) == ["b"]
    # disjoint support: p = (1, 0, 0), q = (0, 0.5, 0.5) -> 1
    assert relative_edm([1.0, 0.0, 0.0], [0.2, 0.7, 0.7], 0.2).edm == pytest.approx(1.0)


def test_relative_edm_below_chance_clipped_and_uniform_fallback():
    # modality 2 is below chance: q = (0.5, 0.5, 0)
    res = relative_edm([0.2, 0.2, 0.0], [0.6, 0.6, 0.1], chance=0.2)
    np.testing.assert_allclose(res.reference, [0.5, 0.5, 0.0])
    assert res.edm == pytest.approx(0.0, abs=1e-12)
    # nothing above chance: uniform reference
    res = relative_edm([0.2, 0.1], [0.1, 0.2], chance=0.5)
    np.testing.assert_allclose(res.reference, [0.5, 0.5])


def test_relative_edm_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="one stand-alone accuracy per modality"):
        relative_edm([0.1, 0.2], [0.5], 0.1)
    with pytest.raises(ValueError):
        relative_edm([0.1, 0.2], [0.5, float("nan")], 0.1)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 8).flatmap(
        lambda m: st.tuples(
            st.lists(finite, min_size=m, max_size=m),
            st.lists(st.floats(0, 1, allow_nan=False), min_size=m, max_size=m),
        )
    ),
    st.floats(0, 1, allow_nan=False),
)
def test_relative_edm_in_unit_interval(inputs, chance):
    phi, acc = inputs
    res = relative_edm(phi, acc, chance)
    assert 0.0 <= res.edm <= 1.0
    assert res.reference.sum() == pytest.approx(1.0)
    assert np.all(res.reference >= 0)
