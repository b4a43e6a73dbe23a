"""The command line: errors are one line with exit code 2 and leave no run folder."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from equimodal.apps.cli import app

from .conftest import small_overrides

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--dataset", "mfet"], "did you mean 'mfeat'"),
        (["--strategy", "shapley_alternate"], "did you mean 'shapley_alternating'"),
        (["--set", "train.epoch=3"], "did you mean 'epochs'"),
        (["--set", "train.epochs=-1"], "train.epochs"),
        (["--set", "train.batch_size=abc"], "train.batch_size"),
        (["--set", "strategy.order_bi=edm"], "did you mean 'order_by'"),
        (["--set", "strategy.order_by=best"], "order_by"),
        (["--fusion", "concat"], "needs fusion 'memory'"),
        (["--set", "model.dim=0"], "model.dim"),
        (["--set", "dataset.options={spilt: tmc}"], "did you mean 'split'"),
        (["--set", "dataset.options={split: nope}"], "nope"),
        (["--config", "does-not-exist.yaml"], "does-not-exist.yaml"),
    ],
)
def test_bad_train_input_is_one_line_exit_2_no_folder(tmp_path, args, expected):
    result = invoke("train", "--out", str(tmp_path / "runs"), *args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert expected in text, text
    assert not (tmp_path / "runs").exists()


def test_bad_yaml_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train: [unclosed\n")
    result = invoke("train", "--config", str(cfg), "--out", str(tmp_path / "runs"))
    assert result.exit_code == 2
    assert "bad.yaml" in result.output and "YAML" in result.output


def test_train_then_evaluate_subset(tmp_path):
    sets = [x for o in small_overrides(epochs=2) for x in ("--set", o)]
    result = invoke("train", "--out", str(tmp_path), "--name", "r", "-q", *sets)
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "Shapley" in result.output
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    for plot in ("curves.png", "shapley.png", "edm.png"):
        assert (tmp_path / "r" / plot).stat().st_size > 1000
    full = invoke("evaluate", str(tmp_path / "r"))
    assert full.exit_code == 0, full.output
    assert f"{100 * metrics['test']['accuracy']:.2f} %" in full.output
    part = invoke("evaluate", str(tmp_path / "r"), "--modalities", "m2")
    assert part.exit_code == 0, part.output
    bad = invoke("evaluate", str(tmp_path / "r"), "--modalities", "m9")
    assert bad.exit_code == 2 and "m9" in bad.output
    missing = invoke("evaluate", str(tmp_path / "nope"))
    assert missing.exit_code == 2 and "nope" in missing.output


def test_second_run_gets_a_new_folder(tmp_path):
    sets = [x for o in small_overrides(epochs=1) for x in ("--set", o)]
    for _ in range(2):
        assert invoke("train", "--out", str(tmp_path), "--name", "same", "-q", *sets).exit_code == 0
    assert (tmp_path / "same").is_dir() and (tmp_path / "same-2").is_dir()


def test_datasets_and_strategies_listing():
    wide = {"COLUMNS": "250"}
    result = runner.invoke(app, ["datasets"], env=wide)
    assert result.exit_code == 0
    for word in ("mfeat", "htad", "synthetic", "CC BY 4.0"):
        assert word in result.output
    result = runner.invoke(app, ["strategies"], env=wide)
    assert result.exit_code == 0
    assert "shapley_alternating" in result.output and "joint" in result.output


def test_report_summarises_seeds_and_draws_plots(tmp_path):
    sets = [x for o in small_overrides(epochs=2) for x in ("--set", o)]
    for seed in (0, 1):
        result = invoke("train", "--out", str(tmp_path), "--seed", str(seed), "-q", *sets)
        assert result.exit_code == 0, result.output
    out_csv = tmp_path / "summary.csv"
    result = invoke("report", str(tmp_path), "--out", str(out_csv), "--plots")
    assert result.exit_code == 0, result.output
    assert "| synthetic | shapley_alternating (memory) | 2 |" in result.output
    import csv
    import json

    (row,) = list(csv.DictReader(out_csv.open()))
    assert row["strategy"] == "shapley_alternating" and row["n_seeds"] == "2"

    accs = [
        json.loads((tmp_path / f"synthetic-shapley_alternating-s{s}" / "metrics.json").read_text())[
            "test"
        ]["accuracy"]
        for s in (0, 1)
    ]
    assert float(row["accuracy_mean"]) == pytest.approx(sum(accs) / 2)
    for name in ("curves.png", "shapley.png", "edm.png"):
        assert (tmp_path / "synthetic-shapley_alternating-s0" / name).stat().st_size > 1000
    report = (tmp_path / "report.md").read_text()
    assert "| synthetic | shapley_alternating (memory) | 2 |" in report
    assert "(figures/synthetic_accuracy_vs_edm.png)" in report
    assert (tmp_path / "figures" / "synthetic_balance_per_epoch.png").is_file()
    # one run folder: its own curves in the report
    single = tmp_path / "synthetic-shapley_alternating-s0"
    assert invoke("report", str(single)).exit_code == 0
    assert "(figures/shapley.png)" in (single / "report.md").read_text()
    empty = invoke("report", str(tmp_path / "nothing"))
    assert empty.exit_code == 2
