"""equimodal bench: a grid of runs, resumable, one summary with a paired test."""

from __future__ import annotations

import csv

import pytest
import yaml
from typer.testing import CliRunner

from equimodal.apps.cli import app

from .conftest import small_overrides


def bench_file(tmp_path, **extra):
    base = {}
    for item in small_overrides(epochs=2):
        key, value = item.split("=", 1)
        node = base
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    dataset = base.pop("dataset")
    base.pop("strategy")
    spec = {
        "seeds": [0, 1],
        "reference": "joint",
        "base": base,
        "datasets": [dataset],
        "methods": [
            {"label": "joint", "strategy": {"name": "joint"}},
            {"label": "ogm", "strategy": {"name": "ogm_ge", "alpha": 0.5}},
        ],
        **extra,
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_bench_runs_the_grid_resumes_and_summarises(tmp_path):
    path = bench_file(tmp_path)
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["bench", str(path), "--out", str(out), "--jobs", "2"])
    assert result.exit_code == 0, result.output
    runs = sorted(p.parent.name for p in out.rglob("metrics.json"))
    assert runs == ["joint-s0", "joint-s1", "ogm-s0", "ogm-s1"]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["method"] for r in rows] == ["joint", "ogm"]
    assert rows[0]["p_value"] == "" and 0.0 <= float(rows[1]["p_value"]) <= 1.0
    assert "paired t-test" in (out / "summary.md").read_text()
    report = (out / "report.md").read_text()
    assert "| synthetic | ogm | 2 |" in report and "paired t-test" in report
    for figure in ("synthetic_accuracy_vs_edm.png", "synthetic_balance_per_epoch.png"):
        assert (out / "figures" / figure).stat().st_size > 10_000
        assert f"figures/{figure}" in report
    # `equimodal report` on the bench folder gives the same table, labels and p-values
    again = runner.invoke(app, ["report", str(out)])
    assert again.exit_code == 0, again.output
    assert (out / "report.md").read_text() == report

    # resume: finished runs are kept, a killed one (no metrics.json) is redone
    kept = (out / "synthetic" / "joint-s0" / "metrics.json").stat().st_mtime_ns
    (out / "synthetic" / "ogm-s1" / "metrics.json").unlink()
    result = runner.invoke(app, ["bench", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 already finished" in " ".join(result.output.split())
    assert (out / "synthetic" / "joint-s0" / "metrics.json").stat().st_mtime_ns == kept
    assert (out / "synthetic" / "ogm-s1" / "metrics.json").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"reference": "nope"}, "reference 'nope' is not a method label"),
        ({"seed": [1]}, "unknown key 'seed'"),
        ({"methods": [{"label": "x", "strategy": {"name": "jont"}}]}, "did you mean 'joint'"),
        ({"seeds": []}, "seeds must be a non-empty list"),
        ({"datasets": [{"name": "synthetic", "setting": {}}]}, "not 'setting'"),
    ],
)
def test_bad_bench_files(tmp_path, extra, message):
    result = CliRunner().invoke(
        app, ["bench", str(bench_file(tmp_path, **extra)), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


def test_dataset_settings_reach_every_run_on_that_dataset(tmp_path):
    from equimodal.apps.bench import load_bench

    path = bench_file(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["datasets"][0]["settings"] = {"model": {"encoder": {"dropout": 0.3}}}
    spec["methods"][1]["model"] = {"encoder": {"dropout": 0.2}}  # a method's own wins
    path.write_text(yaml.safe_dump(spec))
    runs, _ = load_bench(path, tmp_path / "o")
    dropout = {r.label: r.config["model"]["encoder"]["dropout"] for r in runs}
    assert dropout == {"joint": 0.3, "ogm": 0.2}
    assert "settings" not in runs[0].config["dataset"]


def test_bench_adds_robustness_columns(tmp_path):
    path = bench_file(tmp_path, robustness=True, seeds=[0])
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["bench", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "synthetic" / "joint-s0" / "robustness" / "robustness.json").is_file()
    header = (out / "summary.md").read_text().splitlines()[0]
    assert header.endswith("| missing 0.5 % | strongest removed % |")
    row = next(r for r in csv.DictReader((out / "summary.csv").open()) if r["method"] == "ogm")
    assert 0.0 < float(row["missing_0.5_mean"]) <= 1.0


def test_bench_resumes_a_killed_run_from_its_last_complete_epoch(tmp_path, monkeypatch):
    """A run stopped after epoch 1 of 3 continues there and ends as an uninterrupted run."""
    import json

    from equimodal.apps.bench import execute, load_bench
    from equimodal.config import build_config
    from equimodal.engine import trainer as trainer_module

    path = bench_file(tmp_path, seeds=[0])
    spec = yaml.safe_load(path.read_text())
    spec["base"]["train"]["epochs"] = 3
    spec["base"]["train"]["patience"] = None
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    runs, _ = load_bench(path, out)
    assert not execute(runs)
    run = next(r for r in runs if r.run_dir.name == "ogm-s0")
    reference = (run.run_dir / "history.jsonl").read_text()

    class Killed(Exception):
        pass

    def stop_after_first_epoch(row):
        if row["epoch"] == 1:
            raise Killed

    for child in list(run.run_dir.iterdir()):
        if child.is_file():
            child.unlink()
    cfg = build_config(run.config)
    with pytest.raises(Killed):
        trainer_module.Trainer(
            cfg, run_dir=run.run_dir, progress=False, on_epoch=stop_after_first_epoch
        ).fit()
    assert not (run.run_dir / "metrics.json").exists()

    resumed = []
    original = trainer_module.Trainer.__init__

    def spy(self, *args, **kwargs):
        resumed.append(kwargs.get("resume", False))
        original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "__init__", spy)
    assert not execute(runs)
    assert resumed == [True]

    def no_times(text):
        rows = [json.loads(line) for line in text.splitlines()]
        for row in rows:
            row.pop("train_time_s", None), row.pop("eval_time_s", None)
        return rows

    assert no_times((run.run_dir / "history.jsonl").read_text()) == no_times(reference)
