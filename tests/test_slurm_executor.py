"""equimodal bench --executor slurm (submitit): the local executor's runs, on submitit's
local cluster (the same job array code as on SLURM, without a SLURM)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from equimodal.apps.cli import app

from .test_bench import bench_file
from .test_ray_executor import _metrics, _summary


def test_slurm_executor_gives_the_local_runs_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip(
        "submitit", reason="submitit is not installed (pip install 'equimodal[slurm]')"
    )
    # one torch thread per run under both executors: 2 local jobs on "2 cores", 1 CPU per job
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    path = bench_file(tmp_path, seeds=[0])
    runner = CliRunner()
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    result = runner.invoke(app, ["bench", str(path), "--out", str(local), "--jobs", "2"])
    assert result.exit_code == 0, result.output
    command = [
        "bench", str(path), "--out", str(slurm), "--executor", "slurm",
        "--slurm-cluster", "local", "--slurm-cpus", "1", "--slurm-time", "5",
    ]  # fmt: skip
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert _summary(slurm) == _summary(local)
    assert _metrics(slurm) == _metrics(local)
    files = {p.relative_to(local).as_posix() for p in (local / "synthetic").rglob("*")}
    assert files == {p.relative_to(slurm).as_posix() for p in (slurm / "synthetic").rglob("*")}
    assert any((slurm / ".slurm").glob("*_log.out"))  # submitit's logs, beside the runs

    # resumable: a finished run is kept, a missing one is run again
    kept = (slurm / "synthetic" / "joint-s0" / "metrics.json").stat().st_mtime_ns
    (slurm / "synthetic" / "ogm-s0" / "metrics.json").unlink()
    again = runner.invoke(app, command)
    assert again.exit_code == 0, again.output
    assert "1 already finished" in " ".join(again.output.split())
    assert (slurm / "synthetic" / "joint-s0" / "metrics.json").stat().st_mtime_ns == kept
    assert _metrics(slurm) == _metrics(local)


def test_slurm_options_are_checked(tmp_path):
    path = bench_file(tmp_path, seeds=[0])
    runner = CliRunner()
    result = runner.invoke(app, ["bench", str(path), "--slurm-partition", "gpu"])
    assert result.exit_code == 2
    assert "--slurm-partition needs --executor slurm" in result.output
    for extra, message in (
        (["--slurm-param", "account"], "--slurm-param must be KEY=VALUE"),
        (["--slurm-cpus", "0"], "--slurm-cpus must be at least 1"),
        (["--slurm-cluster", "pbs"], "--slurm-cluster must be 'slurm', 'local' or 'debug'"),
    ):
        result = runner.invoke(app, ["bench", str(path), "--executor", "slurm", *extra])
        assert result.exit_code == 2
        assert message in " ".join(result.output.split())


def test_missing_submitit_gives_the_install_hint(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit now raises ImportError
    path = bench_file(tmp_path, seeds=[0])
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["bench", str(path), "--out", str(out), "--executor", "slurm"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "pip install 'equimodal[slurm]'" in text and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_slurm_options_become_submitit_parameters(tmp_path):
    from equimodal.apps.cli import _slurm_options

    kwargs = _slurm_options(
        "slurm", "gpu", 120, 4, 1, 16.0, ["account=proj", "--qos=short"], "slurm", tmp_path
    )
    assert kwargs == {
        "slurm_options": {
            "cluster": "slurm",
            "slurm_partition": "gpu",
            "timeout_min": 120,
            "cpus_per_task": 4,
            "gpus_per_node": 1,
            "mem_gb": 16.0,
            "slurm_additional_parameters": {"account": "proj", "qos": "short"},
        },
        "slurm_folder": tmp_path / ".slurm",
    }


def test_a_failed_job_is_reported_in_one_line_and_the_grid_goes_on(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    from equimodal.apps import bench

    def run_one(config, run_dir, threads):
        if "ogm" in run_dir:
            raise RuntimeError("the data went missing")
        return run_dir

    monkeypatch.setattr(bench, "run_one", run_one)  # debug: jobs run in this process
    monkeypatch.setattr("pdb.post_mortem", lambda *a: None)  # where debug stops on an error
    runs, _ = bench.load_bench(bench_file(tmp_path, seeds=[0]), tmp_path / "out")
    seen = []
    failures = bench.execute(
        runs,
        executor="slurm",
        slurm_options={"cluster": "debug"},
        slurm_folder=tmp_path / "out" / ".slurm",
        on_done=lambda run, error: seen.append((run.label, error is None)),
    )
    assert sorted(seen) == [("joint", True), ("ogm", False)]
    [(run, error)] = failures
    assert run.label == "ogm"
    assert "the data went missing" in str(error) and "\n" not in str(error)
