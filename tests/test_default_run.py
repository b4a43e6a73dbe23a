"""The README's main command, end to end (slow: about 1.5 minutes on 2 CPU cores)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from equimodal.apps.cli import app


@pytest.mark.slow
def test_default_train_on_mfeat(tmp_path):
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "mfeat-shapley_alternating-s0" / "metrics.json").read_text())
    assert metrics["strategy"] == "shapley_alternating" and metrics["fusion"] == "memory"
    assert metrics["test"]["accuracy"] >= 0.99
    assert metrics["train_time_s"] < 180
    shares = metrics["test"]["shapley_share"]
    assert set(shares) == {"fou", "fac", "kar", "pix", "zer", "mor"}
    assert sum(shares.values()) == pytest.approx(1.0)
