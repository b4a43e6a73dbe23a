"""Robustness evaluation: subsets, random missing modalities (CPM-Nets protocol), noise."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from equimodal.apps.cli import app
from equimodal.engine.trainer import Trainer
from equimodal.evaluation.robustness import drop_modalities, evaluate_robustness

from .conftest import small_overrides


def test_drop_keeps_one_modality_per_sample_at_the_asked_rate():
    n, names = 20_000, ["a", "b", "c"]
    present = {m: torch.ones(n, dtype=torch.bool) for m in names}
    present["c"][: n // 2] = False  # c is already absent for half the samples
    after = drop_modalities(present, 0.5, torch.Generator().manual_seed(0))
    stacked = torch.stack([after[m] for m in names], 1)
    assert bool(stacked.any(1).all())  # nobody left with nothing
    assert not bool(after["c"][: n // 2].any())  # never revives an absent modality
    # P(dropped) = eta, minus the re-kept samples that lost everything
    rate_a = 1 - float(after["a"].float().mean())
    assert 0.38 < rate_a < 0.5
    assert drop_modalities(present, 0.0, torch.Generator())["a"].all()
    with pytest.raises(ValueError, match="missing rate"):
        drop_modalities(present, 1.0, torch.Generator())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from equimodal.config import build_config

    config = build_config({}, small_overrides("joint", 3) + ["model.fusion=concat"])
    return Trainer(config, progress=False).fit()


def test_robustness_covers_every_subset_and_degrades_with_missing_rate(trained):
    from equimodal.data.registry import load_dataset

    data = load_dataset("synthetic", seed=0, **_options())
    result = evaluate_robustness(trained.model, data.test, draws=3, seed=0)
    assert len(result.subsets) == 2**3 - 1
    full = result.full["accuracy"]
    assert full == pytest.approx(trained.metrics["test"]["accuracy"])
    accs = [r["accuracy"] for r in result.missing]
    assert accs[-1] < full and accs[-1] <= accs[0] + 0.02  # more missing, lower accuracy
    noise = [r["accuracy"] for r in result.noise]
    assert noise[-1] < full  # sigma 5 hurts
    strongest = result.strongest_removed()
    assert strongest["modality"] == "m0"  # the synthetic data's strong modality
    assert strongest["without"] < full


def _options():
    from equimodal.config import build_config

    return build_config({}, small_overrides("joint", 1)).dataset.options


def test_evaluate_robustness_cli_writes_tables_and_plot(tmp_path):
    runner = CliRunner()
    sets = [a for o in small_overrides("joint", 2) for a in ("--set", o)]
    result = runner.invoke(app, ["train", "-q", "--out", str(tmp_path), "--name", "r", *sets])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "r"), "--robustness", "--draws", "2"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "r" / "robustness"
    data = json.loads((folder / "robustness.json").read_text())
    assert [r["eta"] for r in data["missing"]] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert [r["sigma"] for r in data["noise"]] == [0.5, 1.0, 5.0]
    assert len(data["missing"][0]["draws"]) == 2
    assert (folder / "robustness.png").stat().st_size > 5000
    assert "| missing rate eta" in (folder / "robustness.md").read_text()
    # each group of conditions is announced as it starts (stderr)
    for step in ("robustness: missing rate 0.5, 2 draw(s)", "robustness: noise sigma 5, 2 draw"):
        assert step in result.output
    bad = runner.invoke(app, ["evaluate", str(tmp_path / "r"), "--robustness", "--draws", "0"])
    assert bad.exit_code == 2


def test_training_with_missing_modalities_learns_the_missing_embedding(small_config):
    complete = Trainer(small_config("joint", 2, ["model.fusion=concat"]), progress=False).fit()
    assert torch.count_nonzero(complete.model.fusion.missing) == 0  # exactly zero-filled
    config = small_config("joint", 2, ["model.fusion=concat", "train.missing_rate=0.4"])
    dropped = Trainer(config, progress=False).fit()
    assert torch.count_nonzero(dropped.model.fusion.missing) > 0
    assert dropped.metrics["test"]["accuracy"] > 0.8


def test_train_missing_rate_flag_and_its_bounds(tmp_path):
    runner = CliRunner()
    sets = [a for o in small_overrides("joint", 1) for a in ("--set", o)]
    ok = runner.invoke(
        app, ["train", "-q", "--out", str(tmp_path), "--train-missing-rate", "0.3", *sets]
    )
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(
        app, ["train", "-q", "--out", str(tmp_path / "b"), "--train-missing-rate", "1", *sets]
    )
    assert bad.exit_code == 2 and "missing_rate" in bad.output
    assert not (tmp_path / "b").exists()


def test_a_sample_without_any_modality_is_named():
    from equimodal.data.base import FeatureSplit

    present = {"a": torch.tensor([True, False, True]), "b": torch.tensor([True, False, False])}
    features = {m: torch.zeros(3, 2) for m in present}
    with pytest.raises(ValueError, match="sample 11 has no modality at all"):
        FeatureSplit(features, torch.zeros(3), torch.tensor([10, 11, 12]), present)


def test_a_checkpoint_without_the_missing_embedding_still_loads(small_config):
    from equimodal.engine.checkpoint import load_model_state

    model = Trainer(small_config("joint", 1, ["model.fusion=concat"]), progress=False).fit().model
    state = {k: v for k, v in model.state_dict().items() if k != "fusion.missing"}
    load_model_state(model, state, "old.safetensors")
    assert torch.count_nonzero(model.fusion.missing) == 0
    from equimodal.engine.checkpoint import CheckpointError

    del state["fusion.head.bias"]
    with pytest.raises(CheckpointError, match="missing 'fusion.head.bias'"):
        load_model_state(model, state, "old.safetensors")
