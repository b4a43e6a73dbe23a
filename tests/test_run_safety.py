"""A failure never destroys a run: crashes, NaN losses and SIGTERM keep the folder and
resume exactly; outputs honour the umask and are strict JSON; a full disk while writing
reports leaves no partial file."""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from equimodal.data.registry import load_dataset

DATA = "dataset.options={num_samples: 600, num_classes: 4, signal: [3.0, 1.5, 0.4]}"
TINY = [
    "--dataset", "synthetic", "-s", DATA, "-s", "train.batch_size=64", "-s", "model.dim=16",
    "-s", "model.encoder.hidden=32", "-s", "optim.lr=0.01", "-s", "train.relative_edm=false",
    "-s", "train.patience=null",
]  # fmt: skip
TIMES = {"train_time_s", "final_eval_time_s", "eval_time_s", "versions"}

FLAKY_ENCODER = '''
import os
from pydantic import BaseModel, ConfigDict
from torch import nn
from equimodal.models.encoders import register_encoder

class FlakyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

class Flaky(nn.Module):
    """A user's buggy encoder: training forward number FLAKY_FAIL_AT raises, the outputs
    are NaN from training forward FLAKY_NAN_AT on, and FLAKY_FAIL_EVAL raises in eval."""
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 32), nn.ReLU())
        self.out_dim = 32
        self.calls = 0
    def forward(self, x):
        out = self.net(x.flatten(1))
        if not self.training:
            if os.environ.get("FLAKY_FAIL_EVAL"):
                raise RuntimeError("the flaky encoder failed in evaluation")
            return out
        self.calls += 1
        if self.calls == int(os.environ.get("FLAKY_FAIL_AT", "0")):
            raise RuntimeError("the flaky encoder failed on purpose")
        if 0 < int(os.environ.get("FLAKY_NAN_AT", "0")) <= self.calls:
            return out * float("nan")
        return out

@register_encoder("flaky_mlp", FlakyOptions, "fails on purpose")
def build(spec):
    return Flaky(spec.dim)
'''


def _cli(args, env_extra=None, preexec_fn=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "equimodal", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMES}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _outcome(run: Path):
    metrics = _strip(json.loads((run / "metrics.json").read_text()))
    history = [_strip(json.loads(x)) for x in (run / "history.jsonl").read_text().splitlines()]
    return metrics, history


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture()
def flaky_plugin(tmp_path):
    site = tmp_path / "site"
    (site / "flaky_plugin").mkdir(parents=True)
    (site / "flaky_plugin" / "__init__.py").write_text(FLAKY_ENCODER)
    dist = site / "flaky_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flaky-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[equimodal.encoders]\nflaky_mlp = flaky_plugin\n")
    return {"PYTHONPATH": str(site)}


def test_a_crash_at_epoch_2_keeps_the_run_and_resume_ends_as_an_uninterrupted_run(
    tmp_path, flaky_plugin
):
    args = [*TINY, "--strategy", "joint", "--epochs", "4", "-s", "model.encoder={kind: flaky_mlp}"]
    reference = _cli(["train", "-q", "--out", str(tmp_path / "ref"), *args], flaky_plugin)
    assert reference.returncode == 0, reference.stderr[-2000:]
    env = {**flaky_plugin, "FLAKY_FAIL_AT": str(_train_batches() + 2)}  # epoch 2, batch 2
    crashed = _cli(["train", "-q", "--out", str(tmp_path / "out"), *args], env)
    run = tmp_path / "out" / "synthetic-joint-s0"
    assert crashed.returncode == 1, crashed.stderr[-2000:]
    lines = [x for x in crashed.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "RuntimeError: the flaky encoder failed on purpose" in lines[0]
    assert f"equimodal train --resume {run}" in crashed.stderr.replace("\n", "")
    assert "Traceback" not in crashed.stderr
    assert "flaky encoder failed on purpose" in (run / "error.log").read_text()
    assert (run / "checkpoints" / "last.safetensors").is_file()
    assert not (run / "metrics.json").exists()
    resumed = _cli(["train", "-q", "--resume", str(run)], flaky_plugin)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _outcome(run) == _outcome(tmp_path / "ref" / "synthetic-joint-s0")


def test_a_failure_before_training_begins_leaves_no_folder(tmp_path, flaky_plugin):
    env = {**flaky_plugin, "FLAKY_FAIL_EVAL": "1"}  # fails in the validation before epoch 1
    done = _cli(
        ["train", "-q", "--out", str(tmp_path / "out"), *TINY, "--epochs", "2",
         "-s", "model.encoder={kind: flaky_mlp}"],
        env,
    )  # fmt: skip
    assert done.returncode != 0 and "failed in evaluation" in done.stderr
    assert not (tmp_path / "out").exists()


def _train_batches() -> int:
    data = load_dataset("synthetic", seed=0, num_samples=600, num_classes=4, signal=[3.0, 1.5, 0.4])
    return math.ceil(len(data.train) / 64)


def test_a_nan_loss_stops_the_run_with_a_message_and_keeps_the_folder(tmp_path):
    done = _cli(["train", "-q", "--out", str(tmp_path), *TINY, "-s", "optim.lr=1e12"])
    assert done.returncode == 1, done.stderr[-2000:]
    message = " ".join(done.stderr.split())
    assert "training diverged:" in message and "at epoch 1, batch" in message
    assert "no epoch finished, so there is no checkpoint" in message
    run = tmp_path / "synthetic-shapley_alternating-s0"
    assert (run / "config.yaml").is_file() and (run / "error.log").is_file()
    assert not (run / "metrics.json").exists()


def test_a_nan_loss_after_an_epoch_names_the_last_good_checkpoint(tmp_path, flaky_plugin):
    env = {**flaky_plugin, "FLAKY_NAN_AT": str(2 * _train_batches() + 3)}  # in epoch 3
    done = _cli(
        ["train", "-q", "--out", str(tmp_path), *TINY, "--strategy", "joint", "--epochs", "5",
         "-s", "model.encoder={kind: flaky_mlp}"],
        env,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    message = "".join(done.stderr.split())
    run = tmp_path / "synthetic-joint-s0"
    assert "lossisnanatepoch3,batch3" in message, message
    assert f"thelastgoodcheckpointis{run}/checkpoints/last.safetensors(endofepoch2)" in message
    rows = [_strict_json(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]


def test_sigterm_is_handled_like_ctrl_c_and_resume_continues_exactly(tmp_path):
    args = [*TINY, "--strategy", "joint", "--epochs", "12", "-s", "model.encoder.dropout=0.2"]
    reference = _cli(["train", "-q", "--out", str(tmp_path / "ref"), *args])
    assert reference.returncode == 0, reference.stderr[-2000:]
    run = tmp_path / "out" / "synthetic-joint-s0"
    cmd = [sys.executable, "-m", "equimodal", "train", "-q", "--out", str(tmp_path / "out"), *args]
    child = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.safetensors").is_file():  # an epoch has finished
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    if child.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert child.returncode == 143, stderr[-2000:]
    assert "terminated (SIGTERM)" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    resumed = _cli(["train", "-q", "--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _outcome(run) == _outcome(tmp_path / "ref" / "synthetic-joint-s0")


def test_outputs_honour_the_umask_and_json_is_strict(tmp_path):
    def umask_022():
        os.umask(0o022)

    out = tmp_path / "runs"
    done = _cli(["train", "-q", "--out", str(out), *TINY, "--epochs", "2"], preexec_fn=umask_022)
    assert done.returncode == 0, done.stderr[-2000:]
    run = out / "synthetic-shapley_alternating-s0"
    robust = _cli(["evaluate", str(run), "--robustness", "--draws", "1"], preexec_fn=umask_022)
    assert robust.returncode == 0, robust.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {
        "config.yaml", "history.jsonl", "metrics.json", "best.safetensors", "last.safetensors",
        "curves.png", "robustness.json", "robustness.png",
    }  # fmt: skip
    modes = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {"0o644"}, modes
    folders = {oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_dir()}
    assert folders == {"0o755"}
    for p in files:
        if p.suffix == ".json":
            _strict_json(p.read_text())
        elif p.suffix == ".jsonl":
            for line in p.read_text().splitlines():
                _strict_json(line)


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    done = _cli(["train", "-q", "--out", str(out), *TINY, "--strategy", "joint", "--epochs", "2"])
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "synthetic-joint-s0"


@pytest.mark.parametrize("command", ["diagnose", "evaluate --robustness", "bench"])
def test_a_full_disk_while_writing_leaves_no_partial_file_and_one_line(
    command, finished_run, tmp_path
):
    if command == "bench":
        bench = tmp_path / "bench.yaml"
        bench.write_text(
            "seeds: [0]\nbase: {train: {epochs: 1, relative_edm: false}, model: {dim: 8}}\n"
            "datasets: [{name: synthetic, options: {num_samples: 300}}]\n"
            "methods: [{label: joint, strategy: {name: joint}}]\n"
        )
        root = tmp_path / "bench"
        first = _cli(["bench", str(bench), "--out", str(root)])
        assert first.returncode == 0, first.stderr[-2000:]
        for name in ("summary.md", "summary.csv", "report.md"):
            (root / name).unlink()
        args = ["bench", str(bench), "--out", str(root)]
    else:
        root = finished_run
        args = [*command.split(), str(finished_run)]
        if command.startswith("evaluate"):
            args += ["--draws", "1"]
    before = _listing(root)
    done = _cli(args, preexec_fn=_file_size_limit(300))
    assert done.returncode == 2, done.stdout[-1000:] + done.stderr[-2000:]
    errors = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "File too large" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    after = _listing(root)
    leftovers = [p for p in after if ".partial" in p or p.endswith(".tmp")]
    assert leftovers == []
    for path, size in after.items():  # nothing new unless complete, nothing old changed
        if path in before:
            assert size == before[path], path
        else:
            assert size <= 300, path  # only what fitted under the limit, written whole
