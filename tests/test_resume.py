"""Exact resume: a run killed with SIGKILL mid-training and resumed ends as if never stopped."""

from __future__ import annotations

import json
import os
import select
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
#: the child is killed at this batch of this epoch (three epochs are complete then)
KILL_EPOCH, KILL_BATCH = 4, 5
#: per method: what makes its resume state worth testing
STRATEGY_SETS = {
    # stage 0 (each modality's best predictor kept in the strategy state) spans the kill
    # and ends at epoch 6 with the anchor restored to its best epoch, 3, before the kill
    # (the step schedule doubles the learning rate after epoch 3)
    "udi": ["strategy.anchor_epochs=6", "optim.lr=0.05", "optim.gamma=2.0"],
}

#: the killed run: trained in a child process that says when it reached
#: ``KILL_BATCH`` of ``KILL_EPOCH`` and then waits there to be killed
CHILD = """
import json, sys, time
from equimodal.analysis import fit_run
from equimodal.config import build_config
from equimodal.engine.callbacks import Callback
from equimodal.engine.trainer import Trainer

run_dir, sets, epoch, batch = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:5])


class Signal(Callback):
    def on_epoch_start(self, trainer, state):
        self.seen = 0

    def on_batch_end(self, trainer, state, logs):
        self.seen += 1
        if state.epoch == epoch and self.seen == batch:
            print(f"reached epoch {epoch} batch {batch}", flush=True)
            time.sleep(600)  # the test kills it here


fit_run(Trainer(build_config({}, sets), run_dir=run_dir, progress=False, callbacks=[Signal()]))
"""


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from equimodal.apps.cli import main; main()", *args]


def override_list(strategy: str) -> list[str]:
    # dropout on: the resumed run must restore torch's RNG to match the uninterrupted one
    return (
        small_overrides(strategy, epochs=EPOCHS)
        + [
            "dataset.options={num_samples: 3000, num_classes: 4, signal: [3.0, 1.5, 0.4]}",
            "train.patience=null",
            "model.encoder.dropout=0.2",
            "optim.scheduler=step",
            "optim.step_size=3",
        ]
        + STRATEGY_SETS.get(strategy, [])
    )


def overrides(strategy: str) -> list[str]:
    return [x for o in override_list(strategy) for x in ("--set", o)]


def wait_for_line(proc: subprocess.Popen, marker: str, timeout: float) -> bool:
    """Read the child's stdout until the line ``marker`` (True), its end or ``timeout``.

    The pipe is unbuffered (a raw file reads a line byte by byte), so no line can sit in a
    buffer that ``select`` does not see.
    """
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            return False
        line = proc.stdout.readline()
        if not line:  # the child ended
            return False
        if line.decode().rstrip("\n") == marker:
            return True
    return False


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


@pytest.mark.parametrize("strategy", ["shapley_alternating", "agm", "udi"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, strategy):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = ["train", "-q", "--out", str(tmp_path), *overrides(strategy)]
    subprocess.run(cli(*args, "--name", "ref"), check=True, env=env, capture_output=True)

    run = tmp_path / "killed"
    sets = [*override_list(strategy), "name=killed"]
    child = [
        sys.executable,
        "-c",
        CHILD,
        str(run),
        json.dumps(sets),
        str(KILL_EPOCH),
        str(KILL_BATCH),
    ]
    with open(tmp_path / "killed.stderr", "w+") as stderr:
        proc = subprocess.Popen(child, env=env, stdout=subprocess.PIPE, stderr=stderr, bufsize=0)
        try:
            # the child blocks inside that batch until it is killed
            marker = f"reached epoch {KILL_EPOCH} batch {KILL_BATCH}"
            reached = wait_for_line(proc, marker, timeout=300)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        stderr.seek(0)
        assert reached, f"the child did not reach the batch: {stderr.read()}"
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "metrics.json").exists()
    assert history_rows(run) == KILL_EPOCH  # rows 0 .. KILL_EPOCH - 1: the epochs complete

    result = subprocess.run(
        cli("train", "-q", "--resume", str(run)), env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert f"resuming {run}" in " ".join(result.stderr.split()), result.stderr
    ref_history, ref_metrics = read_run(tmp_path / "ref")
    history, metrics = read_run(run)
    assert len(history) == EPOCHS + 1
    assert history == ref_history
    if strategy == "udi":  # the anchor's best weights came through the resume
        assert ref_history[6]["anchor_epoch"] < KILL_EPOCH < 6, ref_history[6]
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
