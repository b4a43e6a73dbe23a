"""Exact resume: a run killed with SIGKILL mid-training and resumed ends as if never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from equimodal.apps.cli import app

from .conftest import small_overrides

#: what differs between two identical runs: wall-clock times
TIME_KEYS = {"train_time_s", "eval_time_s", "final_eval_time_s"}
EPOCHS = 8


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from equimodal.apps.cli import main; main()", *args]


def overrides(strategy: str) -> list[str]:
    # dropout on: the resumed run must restore torch's RNG to match the uninterrupted one
    sets = small_overrides(strategy, epochs=EPOCHS) + [
        "dataset.options={num_samples: 3000, num_classes: 4, signal: [3.0, 1.5, 0.4]}",
        "train.patience=null",
        "model.encoder.dropout=0.2",
        "optim.scheduler=step",
        "optim.step_size=3",
    ]
    return [x for o in sets for x in ("--set", o)]


def without_times(obj):
    if isinstance(obj, dict):
        return {k: without_times(v) for k, v in obj.items() if k not in TIME_KEYS}
    if isinstance(obj, list):
        return [without_times(v) for v in obj]
    return obj


def read_run(run: Path) -> tuple[list[dict], dict]:
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    metrics = json.loads((run / "metrics.json").read_text())
    return without_times(history), without_times(metrics)


def history_rows(run: Path) -> int:
    try:
        return len((run / "history.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("strategy", ["shapley_alternating", "agm"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, strategy):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = ["train", "-q", "--out", str(tmp_path), *overrides(strategy)]
    subprocess.run(cli(*args, "--name", "ref"), check=True, env=env, capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        cli(*args, "--name", "killed"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    # kill it while it trains epoch 4 (three epochs are complete; epoch 0 is the initial row)
    deadline = time.monotonic() + 120
    while history_rows(run) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run / "metrics.json").exists()
    done = history_rows(run)
    assert 4 <= done <= EPOCHS, done

    result = subprocess.run(
        cli("train", "-q", "--resume", str(run)), env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert f"resuming {run}" in " ".join(result.stderr.split()), result.stderr
    ref_history, ref_metrics = read_run(tmp_path / "ref")
    history, metrics = read_run(run)
    assert len(history) == EPOCHS + 1
    assert history == ref_history
    ref_metrics.pop("run"), metrics.pop("run")
    assert metrics == ref_metrics


def test_resume_refuses_a_finished_run_and_a_folder_without_a_checkpoint(tmp_path):
    runner = CliRunner()
    args = ["train", "-q", "--out", str(tmp_path), "--name", "done"]
    sets = small_overrides("joint", epochs=1)
    result = runner.invoke(app, args + [x for o in sets for x in ("--set", o)])
    assert result.exit_code == 0, result.output
    finished = runner.invoke(app, ["train", "--resume", str(tmp_path / "done")])
    assert finished.exit_code == 2
    assert "already finished" in " ".join(finished.output.split())
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(app, ["train", "--resume", str(tmp_path / "empty")])
    assert empty.exit_code == 2
    assert "last.safetensors" in " ".join(empty.output.split())
    missing = runner.invoke(app, ["train", "--resume", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "does not exist" in " ".join(missing.output.split())
