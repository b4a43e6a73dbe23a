"""The bench's tuning: the same budget for every method, chosen on validation only."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from equimodal.apps.bench import load_tuning
from equimodal.apps.cli import app
from equimodal.config import ConfigError, build_config
from equimodal.core.registries import DATASETS
from equimodal.data.registry import get_entry, register_dataset

POISON = {"on": False}


def _register_poisonable() -> None:
    """``poisonable``: synthetic data whose test split can be replaced by garbage."""
    if "poisonable" in DATASETS:
        return
    synthetic = get_entry("synthetic")

    @register_dataset(replace(synthetic.info, name="poisonable"))
    def load_poisonable(*, seed: int = 0, num_samples: int = 400):
        data = synthetic.loader(seed=seed, num_samples=num_samples, signal=[3.0, 1.0, 0.3])
        if POISON["on"]:
            test = data.test
            rng = np.random.default_rng(123)
            test.labels[:] = test.labels[rng.permutation(len(test.labels))]
            for x in test.features.values():
                x.mul_(-50.0)
        return data


BENCH = """
seeds: [0]
reference: joint
base:
  model: {dim: 8, encoder: {hidden: 16}}
  train: {epochs: 2, relative_edm: false, batch_size: 64}
tune:
  seeds: [10, 11]
  budget: 2
  grid: {optim.lr: [0.03, 0.001]}
datasets: [{name: poisonable}]
methods:
  - {label: joint, strategy: {name: joint}}
  - {label: ogm, strategy: {name: ogm_ge}, model: {fusion: concat},
     tune: {strategy.alpha: [0.4, 0.8]}}
"""


def _bench(tmp_path, text=BENCH):
    path = tmp_path / "bench.yaml"
    path.write_text(text)
    return path


def test_every_method_gets_the_same_number_of_trials(tmp_path):
    trials, runs = load_tuning(_bench(tmp_path), tmp_path / "out")
    per_method = {}
    for t in trials:
        per_method.setdefault(t.label, []).append(t.settings)
    assert {k: len(v) for k, v in per_method.items()} == {"joint": 2, "ogm": 2}
    assert all("optim.lr" in s and "strategy.alpha" in s for s in per_method["ogm"])
    assert len(runs) == 4 * 2  # trials x tuning seeds
    for run in runs:
        cfg = build_config(run.config)
        assert not cfg.train.score_test and not cfg.train.relative_edm
        assert cfg.seed in (10, 11) and "tuning" in run.run_dir.parts


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("  budget: 2\n", ""), "different tuning budgets"),
        (("budget: 2", "budget: 5"), "fewer than tune.budget 5"),
        (("seeds: [10, 11]", "seeds: [0, 11]"), "also an evaluation seed"),
        (("grid: {optim.lr: [0.03, 0.001]}", "grid: {optim.lr: 0.03}"), "non-empty lists"),
    ],
)
def test_unfair_or_malformed_tuning_is_refused(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_tuning(_bench(tmp_path, BENCH.replace(*edit)), tmp_path / "out")


def _tune_and_run(tmp_path, name, poison: bool):
    _register_poisonable()
    POISON["on"] = poison
    try:
        out = tmp_path / name
        result = CliRunner().invoke(app, ["bench", str(_bench(tmp_path)), "--out", str(out)])
    finally:
        POISON["on"] = False
    assert result.exit_code == 0, result.output
    return out


def test_choice_reads_validation_only_and_the_runs_use_it(tmp_path):
    clean = _tune_and_run(tmp_path, "clean", poison=False)
    # the test split is garbage while tuning: the choice and its scores must not move
    poisoned = _tune_and_run(tmp_path, "poisoned", poison=True)
    record = json.loads((clean / "tuning.json").read_text())
    assert record == json.loads((poisoned / "tuning.json").read_text())
    for run in (clean / "tuning").rglob("metrics.json"):
        assert json.loads(run.read_text())["test"] == {}  # test never scored while tuning
    for label, entry in record["poisonable"].items():
        means = [t["mean_val_accuracy"] for t in entry["trials"]]
        assert len(means) == 2 and entry["chosen"] == int(np.argmax(means))
        chosen = entry["trials"][entry["chosen"]]["settings"]
        config = (clean / "poisonable" / f"{label}-s0" / "config.yaml").read_text()
        assert f"lr: {chosen['optim.lr']}" in config
        if "strategy.alpha" in chosen:
            assert f"alpha: {chosen['strategy.alpha']}" in config
    summary = (clean / "summary.md").read_text()
    assert "| joint | 1 |" in summary and "#t" not in summary  # no tuning rows
    report = (clean / "report.md").read_text()
    assert "## Tuning (chosen on validation only)" in report
