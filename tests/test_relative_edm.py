"""Relative EDM in the metrics: stand-alone abilities from unimodal runs, cached once."""

from __future__ import annotations

import json

import pytest

from equimodal.analysis import fit_run, standalone
from equimodal.balance import relative_edm
from equimodal.engine.trainer import Trainer


def test_relative_edm_in_metrics_and_cached(small_config, tmp_path, monkeypatch):
    monkeypatch.setattr(standalone, "_MEMORY_CACHE", {})
    config = small_config("joint", epochs=2, extra=["train.relative_edm=true"])
    first = fit_run(Trainer(config, run_dir=tmp_path / "a", progress=False)).metrics
    test = first["test"]
    ability = test["standalone_val_accuracy"]
    assert set(ability) == {"m0", "m1", "m2"}
    assert ability["m0"] > ability["m2"]  # the strong modality is stronger alone
    chance = first["val"]["v_empty"]
    phi = [test["shapley"][m] for m in ("m0", "m1", "m2")]
    expected = relative_edm(phi, [ability[m] for m in ("m0", "m1", "m2")], chance)
    assert test["relative_edm"] == pytest.approx(expected.edm)
    assert 0.0 <= first["val"]["relative_edm"] <= 1.0
    cached = list((tmp_path / ".standalone").glob("*.json"))
    assert len(cached) == 1
    assert json.loads(cached[0].read_text())["accuracy"] == ability

    # a second method on the same data, seed and settings reuses the abilities
    monkeypatch.setattr(standalone, "_MEMORY_CACHE", {})
    calls = []
    original = standalone.unimodal_config
    monkeypatch.setattr(standalone, "unimodal_config", lambda *a: calls.append(a) or original(*a))
    other = small_config("ogm_ge", epochs=2, extra=["train.relative_edm=true"])
    second = fit_run(Trainer(other, run_dir=tmp_path / "b", progress=False)).metrics
    assert calls == []
    assert second["test"]["standalone_val_accuracy"] == ability


def test_relative_edm_can_be_switched_off(small_config):
    metrics = fit_run(Trainer(small_config("joint", epochs=1), progress=False)).metrics
    assert "relative_edm" not in metrics["test"]
