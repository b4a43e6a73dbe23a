"""equimodal bench --executor ray: the same runs and summary as the local process pool."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from equimodal.apps.cli import app

from .test_bench import bench_file


def _summary(folder):
    """summary.csv without the training-time columns (wall clock differs run to run)."""
    rows = list(csv.DictReader((folder / "summary.csv").open()))
    return [{k: v for k, v in r.items() if "time" not in k} for r in rows]


def _metrics(folder):
    out = {}
    for path in sorted(folder.rglob("metrics.json")):
        m = json.loads(path.read_text())
        out[path.parent.relative_to(folder).as_posix()] = (m["test"], m["val"], m["best_epoch"])
    return out


def test_ray_executor_gives_the_local_summary(tmp_path, monkeypatch):
    ray = pytest.importorskip(
        "ray", reason="ray is not installed (pip install 'equimodal[distributed]')"
    )
    # one torch thread per run under both executors: 2 local jobs on "2 cores", 1 CPU per task
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    path = bench_file(tmp_path, seeds=[0])
    runner = CliRunner()
    local, remote = tmp_path / "local", tmp_path / "ray"
    result = runner.invoke(app, ["bench", str(path), "--out", str(local), "--jobs", "2"])
    assert result.exit_code == 0, result.output

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = runner.invoke(app, ["bench", str(path), "--out", str(remote), "--executor", "ray"])
        assert result.exit_code == 0, result.output
        assert ray.is_initialized()  # a Ray the caller started is left running
        # resumable: a finished run is kept, a missing one is run again
        kept = (remote / "synthetic" / "joint-s0" / "metrics.json").stat().st_mtime_ns
        (remote / "synthetic" / "ogm-s0" / "metrics.json").unlink()
        again = runner.invoke(app, ["bench", str(path), "--out", str(remote), "--executor", "ray"])
        assert again.exit_code == 0, again.output
        assert "1 already finished" in " ".join(again.output.split())
        assert (remote / "synthetic" / "joint-s0" / "metrics.json").stat().st_mtime_ns == kept
    finally:
        ray.shutdown()

    assert _summary(remote) == _summary(local)
    assert _metrics(remote) == _metrics(local)
    files = {p.relative_to(local).as_posix() for p in (local / "synthetic").rglob("*")}
    assert files == {p.relative_to(remote).as_posix() for p in (remote / "synthetic").rglob("*")}


def test_ray_executor_options_are_checked(tmp_path):
    path = bench_file(tmp_path, seeds=[0])
    runner = CliRunner()
    result = runner.invoke(app, ["bench", str(path), "--executor", "dask"])
    assert result.exit_code == 2
    assert "--executor must be 'local', 'ray' or 'slurm'" in result.output
    result = runner.invoke(app, ["bench", str(path), "--address", "auto"])
    assert result.exit_code == 2
    assert "--address needs --executor ray" in result.output


def test_missing_ray_gives_the_install_hint(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    path = bench_file(tmp_path, seeds=[0])
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["bench", str(path), "--out", str(out), "--executor", "ray"])
    assert result.exit_code == 2
    assert "pip install 'equimodal[distributed]'" in " ".join(result.output.split())
    assert not out.exists()
