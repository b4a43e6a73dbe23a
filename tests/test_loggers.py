"""Experiment trackers (``train.loggers``): what each one writes reads back as the run's
history and metrics."""

from __future__ import annotations

import csv
import json
import math
import sys

import pytest

from equimodal.config import LOGGERS, ConfigError, build_config
from equimodal.engine.loggers import LOGGER_CLASSES, csv_cell, flatten
from equimodal.engine.trainer import Trainer


def _train(small_config, tmp_path, loggers: list[str], epochs: int = 2):
    cfg = small_config(epochs=epochs, extra=[f"train.loggers=[{', '.join(loggers)}]"])
    run_dir = tmp_path / "run"
    result = Trainer(cfg, run_dir=run_dir, progress=False).fit()
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return result, run_dir, history


def test_config_names_the_valid_loggers():
    assert build_config({}).train.loggers == []
    assert tuple(LOGGER_CLASSES) == LOGGERS
    with pytest.raises(ConfigError, match="unknown logger 'neptune'; valid loggers: csv, "):
        build_config({}, ["train.loggers=[csv, neptune]"])
    with pytest.raises(ConfigError, match="twice"):
        build_config({}, ["train.loggers=[csv, csv]"])


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'equimodal\[wandb\]'"):
        LOGGER_CLASSES["wandb"](tmp_path)


def test_without_run_folder_loggers_warn_and_log_nothing(small_config):
    cfg = small_config(epochs=1, extra=["train.loggers=[csv]"])
    with pytest.warns(UserWarning, match="no run folder"):
        Trainer(cfg, progress=False).fit()


def test_csv_equals_history(small_config, tmp_path):
    result, run_dir, history = _train(small_config, tmp_path, ["csv"])
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [r["epoch"] for r in history] == [0, 1, 2]
    flat = [flatten(r) for r in history]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    assert list(rows[0]) == columns
    for got, want in zip(rows, flat, strict=True):
        assert got == {c: csv_cell(want.get(c)) for c in columns}
    last = rows[-1]
    assert float(last["val/accuracy"]) == history[-1]["val"]["accuracy"]
    assert float(last["train/loss"]) == history[-1]["train"]["loss"]
    assert last["order"] == json.dumps(history[-1]["order"])
    modality = next(iter(history[-1]["val"]["shapley"]))
    assert float(last[f"val/shapley/{modality}"]) == history[-1]["val"]["shapley"][modality]
    assert float(last[f"val/shapley_share/{modality}"]) == pytest.approx(
        history[-1]["val"]["shapley_share"][modality]
    )
    assert "val/edm" in last


def test_tensorboard_events(small_config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, run_dir, history = _train(small_config, tmp_path, ["tensorboard"])
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    accuracy = events.Scalars("val/accuracy")
    assert [e.step for e in accuracy] == [0, 1, 2]
    assert [e.value for e in accuracy] == pytest.approx([r["val"]["accuracy"] for r in history])
    loss = events.Scalars("train/loss")
    assert loss[-1].value == pytest.approx(history[-1]["train"]["loss"])
    final = events.Scalars("final/test/accuracy")
    assert final[0].value == pytest.approx(result.metrics["test"]["accuracy"])


def _wandb_summary(path) -> dict:
    """The summary updates of an offline run's ``.wandb`` file (a LevelDB-style log of
    protobuf records: 7-byte header, 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, chunk, summary = path.read_bytes(), 32768, 7, b"", {}
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # block trailer or padding
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "summary":
                for item in record.summary.update:
                    summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


def test_wandb_offline(small_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result, run_dir, history = _train(small_config, tmp_path, ["wandb"], epochs=1)
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (log,) = offline.glob("*.wandb")
    summary = _wandb_summary(log)
    assert summary["final/val/accuracy"] == pytest.approx(result.metrics["val"]["accuracy"])
    assert summary["final/test/accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])


def test_mlflow_local_store(small_config, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    result, run_dir, history = _train(small_config, tmp_path, ["mlflow"])
    db = (run_dir / "mlruns" / "mlflow.db").resolve()
    assert db.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("equimodal")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2"
    assert run.data.tags["order"] == ">".join(history[-1]["order"])
    accuracy = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert sorted((m.step, m.value) for m in accuracy) == [
        (r["epoch"], pytest.approx(r["val"]["accuracy"])) for r in history
    ]
    final = run.data.metrics["final/test/accuracy"]
    assert math.isclose(final, result.metrics["test"]["accuracy"], rel_tol=1e-6)
