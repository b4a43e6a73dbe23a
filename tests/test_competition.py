"""AGM's competition strength: 0 when fusion keeps a modality's concept, 1 when it loses it."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from equimodal.apps.cli import app
from equimodal.balance.competition import competition_strength, ridge_fit

from .conftest import small_overrides


def test_ridge_fit_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 4))
    w_true = rng.normal(size=(4, 2))
    w, b = ridge_fit(x, x @ w_true + 3.0, alpha=1e-8)
    np.testing.assert_allclose(w, w_true, atol=1e-6)
    np.testing.assert_allclose(b, 3.0, atol=1e-6)


def test_strength_is_near_zero_when_the_concept_survives_and_near_one_when_lost():
    rng = np.random.default_rng(1)
    n, d = 4000, 8
    u = rng.normal(size=(2 * n, d)) * 5
    kept = np.concatenate([u, rng.normal(size=(2 * n, 16))], 1)  # Z carries U
    lost = rng.normal(size=(2 * n, 24))  # Z knows nothing of U
    fit, test = slice(0, n), slice(n, None)
    assert competition_strength(kept[fit], u[fit], kept[test], u[test]) < 0.01
    assert competition_strength(lost[fit], u[fit], lost[test], u[test]) == pytest.approx(
        1.0, abs=0.02
    )
    # half of the concept's dimensions survive: about half the strength
    half = np.concatenate([u[:, :4], rng.normal(size=(2 * n, 4))], 1)
    assert competition_strength(half[fit], u[fit], half[test], u[test]) == pytest.approx(
        0.5, abs=0.03
    )


def test_strength_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same number of rows"):
        competition_strength(np.ones((5, 2)), np.ones((4, 2)), np.ones((5, 2)), np.ones((5, 2)))


def test_evaluate_competition_from_the_cli(tmp_path):
    runner = CliRunner()
    sets = [a for o in small_overrides("joint", 2) for a in ("--set", o)]
    result = runner.invoke(app, ["train", "-q", "--out", str(tmp_path), "--name", "r", *sets])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "r"), "--competition"])
    assert result.exit_code == 0, result.output
    assert "competition strength" in result.output
    for m in ("m0", "m1", "m2"):
        assert m in result.output
