"""Bit-identical reproduction: one committed README bench run per method, retrained here at
its recorded thread count, gives exactly its committed metrics (wall-clock times aside)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from equimodal.analysis import fit_run
from equimodal.apps.bench import load_bench
from equimodal.config import build_config
from equimodal.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
#: the committed benches: the README table and the BalanceBenchmark methods' table
RESULTS = (ROOT / "results" / "readme", ROOT / "results" / "balancebenchmark")
DATASET, SEED = "htad", 0  # the fastest dataset of the table
IGNORED = {"train_time_s", "final_eval_time_s", "versions"}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in IGNORED}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _committed_runs():
    runs = []
    for results in RESULTS:
        if not (results / "bench.yaml").is_file():
            continue
        chosen = None
        tuning = results / "tuning.json"
        if tuning.is_file():
            record = json.loads(tuning.read_text())
            chosen = {
                (dataset, label): entry["trials"][entry["chosen"]]["settings"]
                for dataset, methods in record.items()
                for label, entry in methods.items()
                if entry["chosen"] is not None
            }
        found, _ = load_bench(results / "bench.yaml", results, chosen)
        seen = {r.label for r in runs}  # a method in both benches is the same run
        runs += [
            r
            for r in found
            if r.dataset == DATASET
            and r.seed == SEED
            and r.label not in seen
            and (r.run_dir / "metrics.json").is_file()
        ]
    return runs


@pytest.mark.parametrize("run", _committed_runs(), ids=lambda r: r.label)
def test_a_committed_readme_run_retrains_to_identical_metrics(run, tmp_path):
    committed = json.loads((run.run_dir / "metrics.json").read_text())
    if "threads" not in committed:
        pytest.skip("the committed run predates the recorded thread count")
    previous = torch.get_num_threads()
    torch.set_num_threads(committed["threads"])
    try:
        config = build_config(run.config)
        result = fit_run(Trainer(config, run_dir=tmp_path / run.run_dir.name, progress=False))
    finally:
        torch.set_num_threads(previous)
    assert _strip(result.metrics) == _strip(committed)
