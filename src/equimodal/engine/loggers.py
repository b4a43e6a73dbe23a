"""Experiment trackers as callbacks: ``train.loggers: [csv, tensorboard, wandb, mlflow]``.

Each logger writes, per epoch, the numbers of the epoch's history row (train losses,
validation accuracy and loss, Shapley values and shares per modality, EDM, learning rate,
times) with the epoch as the step, and the modality order when the row has one; at the
start the flattened config as hyperparameters, at the end the final metrics (``final/val/
...``, ``final/test/...``). Keys are the row's nested keys joined by ``/`` (``train/loss``,
``val/accuracy``, ``val/shapley/audio``, ``val/shapley_share/audio``, ``val/edm``).

=================  ==========================================  ===========================
logger             writes to                                   needs
=================  ==========================================  ===========================
``csv``            ``RUN/metrics.csv``, one row per epoch      nothing
``tensorboard``    ``RUN/tensorboard/`` (event files)          ``equimodal[tensorboard]``
``wandb``          a W&B run, local files in ``RUN/wandb/``;   ``equimodal[wandb]``
                   ``WANDB_MODE=offline`` keeps it local;
                   project ``WANDB_PROJECT`` or ``equimodal``
``mlflow``         ``MLFLOW_TRACKING_URI`` or a local store:   ``equimodal[mlflow]``
                   ``RUN/mlruns/mlflow.db`` (SQLite) with
                   ``RUN/mlruns/artifacts``; experiment
                   ``MLFLOW_EXPERIMENT_NAME`` or ``equimodal``
=================  ==========================================  ===========================

The optional packages are imported when the logger is built (before the first epoch); a
missing one is an ImportError that names the pip extra. The trainer builds the loggers
only for a run with a run folder, and runs callbacks on rank 0 only, so only rank 0 logs.
A resumed run rewrites ``metrics.csv`` from the checkpointed history, continues the
TensorBoard events after the last checkpointed epoch, and logs the whole history to a new
W&B or MLflow run.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from equimodal.config import LOGGERS, RunConfig
from equimodal.core.files import write_text_atomic
from equimodal.engine.callbacks import Callback, FitState, Trainer

__all__ = [
    "CSVLogger",
    "Logger",
    "MLflowLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "build_loggers",
    "csv_cell",
    "flatten",
]


# ---------------------------------------------------------------------- flattening
def flatten(tree: dict[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict whose keys join the nested keys with ``sep``; other values
    (numbers, strings, lists) stay as they are."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, sep, name))
        else:
            out[name] = value
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalars(row: dict[str, Any], skip: tuple[str, ...] = ("epoch",)) -> dict[str, float]:
    """The numeric leaves of ``row`` (booleans as 0/1) under their ``/``-joined keys."""
    out: dict[str, float] = {}
    for key, value in flatten(row).items():
        if key in skip:
            continue
        if isinstance(value, bool) or _is_number(value):
            out[key] = float(value)
    return out


def order_text(row: dict[str, Any]) -> str | None:
    """The row's modality order as ``a>b>c``, or None when it has none."""
    order = row.get("order")
    if isinstance(order, (list, tuple)) and order:
        return ">".join(map(str, order))
    return None


def csv_cell(value: Any) -> str:
    """A value as a ``metrics.csv`` cell: numbers as Python writes them (round-trip),
    strings as they are, None empty, everything else (booleans, lists) as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if _is_number(value):
        return repr(float(value)) if isinstance(value, float) else str(value)
    return json.dumps(value)


def hyperparameters(config: RunConfig) -> dict[str, Any]:
    """The resolved config flattened with ``.`` (as ``--set`` names keys); values are
    numbers, strings or booleans (lists and None as JSON text)."""
    out: dict[str, Any] = {}
    for key, value in flatten(config.model_dump(mode="json"), sep=".").items():
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value)
    return out


def final_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of the final metrics worth tracking, under ``final/``."""
    keep = {k: metrics[k] for k in ("val", "test", "best_epoch", "epochs_run", "train_time_s")}
    keep = {k: v for k, v in keep.items() if v not in (None, {})}
    return {f"final/{k}": v for k, v in scalars(keep, skip=()).items()}


def _require(module: str, extra: str) -> Any:
    """Import ``module`` or fail in one line naming the pip extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"train.loggers {extra!r} needs the {extra} package: pip install 'equimodal[{extra}]'"
        ) from None


# ---------------------------------------------------------------------- loggers
class Logger(Callback):
    """Base of the trackers: logs each history row once, in epoch order.

    Subclasses implement :meth:`start`, :meth:`log_row`, :meth:`finish` and :meth:`close`
    (the trainer calls ``close`` when the loop ends, also on error).
    """

    name = ""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.next_epoch = 0

    def on_fit_start(self, trainer: Trainer, state: FitState) -> None:
        self.next_epoch = 0
        self.start(trainer, state)

    def on_epoch_end(self, trainer: Trainer, state: FitState, row: dict[str, Any]) -> None:
        for r in state.history:  # row 0 (before training) is logged with epoch 1
            if int(r["epoch"]) >= self.next_epoch:
                self.log_row(r)
                self.next_epoch = int(r["epoch"]) + 1

    def on_fit_end(self, trainer: Trainer, state: FitState, metrics: dict[str, Any]) -> None:
        self.finish(state, metrics)

    def start(self, trainer: Trainer, state: FitState) -> None:
        """Open the tracker and log the config."""

    def log_row(self, row: dict[str, Any]) -> None:
        """Log one epoch's history row."""

    def finish(self, state: FitState, metrics: dict[str, Any]) -> None:
        """Log the final metrics and close the tracker."""

    def close(self) -> None:
        """Release the tracker if :meth:`finish` did not (the run failed)."""


class CSVLogger(Logger):
    """``RUN/metrics.csv``: the history, one row per epoch, flat ``/``-joined columns.

    The file is rewritten whole (atomically) from the history after every epoch, so a
    column that appears later (a strategy's field) and a resumed run need no special care.
    """

    name = "csv"

    @property
    def path(self) -> Path:
        return self.run_dir / "metrics.csv"

    def on_epoch_end(self, trainer: Trainer, state: FitState, row: dict[str, Any]) -> None:
        import csv
        import io

        rows = [flatten(r) for r in state.history]
        columns: dict[str, None] = {}
        for r in rows:
            columns.update(dict.fromkeys(r))
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow([csv_cell(r.get(c)) for c in columns])
        write_text_atomic(self.path, buffer.getvalue())


class TensorBoardLogger(Logger):
    """TensorBoard event files in ``RUN/tensorboard/`` (``tensorboard --logdir RUN``)."""

    name = "tensorboard"

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(run_dir)
        self._tb = _require("torch.utils.tensorboard", "tensorboard")
        self.writer: Any = None

    def start(self, trainer: Trainer, state: FitState) -> None:
        # a resumed run drops events of epochs after the checkpoint and continues there
        purge = state.first_epoch if state.resumed else None
        self.writer = self._tb.SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)
        if state.resumed:
            self.next_epoch = state.first_epoch
            return
        from torch.utils.tensorboard.summary import hparams

        params = hyperparameters(trainer.config)
        metric_names = {"final/val/accuracy": 0.0, "final/test/accuracy": 0.0}
        for summary in hparams(params, metric_names):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def log_row(self, row: dict[str, Any]) -> None:
        step = int(row["epoch"])
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, step)
        order = order_text(row)
        if order is not None:
            self.writer.add_text("order", order, step)
        self.writer.flush()

    def finish(self, state: FitState, metrics: dict[str, Any]) -> None:
        for key, value in final_scalars(metrics).items():
            self.writer.add_scalar(key, value, state.best_epoch)
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbLogger(Logger):
    """A Weights & Biases run (``wandb.init(project, dir=RUN, config)``); ``WANDB_MODE``
    (``offline``, ``disabled``) and the other ``WANDB_*`` variables apply as usual."""

    name = "wandb"

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(run_dir)
        self._wandb = _require("wandb", "wandb")
        self.run: Any = None

    def start(self, trainer: Trainer, state: FitState) -> None:
        config: RunConfig = trainer.config
        self.run = self._wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "equimodal",
            name=config.run_name(),
            dir=str(self.run_dir),
            config=hyperparameters(config),
        )

    def log_row(self, row: dict[str, Any]) -> None:
        data: dict[str, Any] = {"epoch": int(row["epoch"]), **scalars(row)}
        order = order_text(row)
        if order is not None:
            data["order"] = order
        self.run.log(data, step=int(row["epoch"]))

    def finish(self, state: FitState, metrics: dict[str, Any]) -> None:
        for key, value in final_scalars(metrics).items():
            self.run.summary[key] = value
        self.run.finish()
        self.run = None

    def close(self) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1)
            self.run = None


class MLflowLogger(Logger):
    """An MLflow run: tracking URI ``MLFLOW_TRACKING_URI`` or the SQLite store
    ``RUN/mlruns/mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///RUN/mlruns/mlflow.db``);
    experiment ``MLFLOW_EXPERIMENT_NAME`` or ``equimodal``. The config is
    logged as params, the order as the tag ``order`` (latest) and the ``orders.tsv``
    artifact (every epoch's, at the end)."""

    name = "mlflow"

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(run_dir)
        self._mlflow = _require("mlflow", "mlflow")
        self.client: Any = None
        self.run_id: str | None = None

    @property
    def store(self) -> Path:
        """The local store without ``MLFLOW_TRACKING_URI``: ``RUN/mlruns`` (MLflow 3 keeps
        the plain file store in maintenance mode, so runs go to an SQLite database there,
        artifacts beside it)."""
        return (self.run_dir / "mlruns").resolve()

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.store / 'mlflow.db'}"

    def start(self, trainer: Trainer, state: FitState) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            self.store.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "equimodal"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        elif os.environ.get("MLFLOW_TRACKING_URI"):
            experiment_id = self.client.create_experiment(name)
        else:
            artifacts = (self.store / "artifacts").as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        config: RunConfig = trainer.config
        self.run_id = self.client.create_run(experiment_id, run_name=config.run_name()).info.run_id
        params = [Param(k, str(v)) for k, v in hyperparameters(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items() if math.isfinite(v)]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_row(self, row: dict[str, Any]) -> None:
        self._log_metrics(scalars(row), int(row["epoch"]))
        order = order_text(row)
        if order is not None:
            self.client.set_tag(self.run_id, "order", order)

    def finish(self, state: FitState, metrics: dict[str, Any]) -> None:
        self._log_metrics(final_scalars(metrics), state.best_epoch)
        orders = [(r["epoch"], order_text(r)) for r in state.history]
        if any(o is not None for _, o in orders):
            text = "epoch\torder\n" + "".join(f"{e}\t{o}\n" for e, o in orders if o)
            self.client.log_text(self.run_id, text, "orders.tsv")
        self.client.set_terminated(self.run_id, "FINISHED")
        self.run_id = None

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FAILED")
            self.run_id = None


#: ``train.loggers`` names -> logger classes
LOGGER_CLASSES: dict[str, type[Logger]] = {
    "csv": CSVLogger,
    "tensorboard": TensorBoardLogger,
    "wandb": WandbLogger,
    "mlflow": MLflowLogger,
}
assert tuple(LOGGER_CLASSES) == LOGGERS, "equimodal.config.LOGGERS and the classes differ"


def build_loggers(names: list[str], run_dir: str | Path) -> list[Logger]:
    """The loggers ``train.loggers`` names, writing under ``run_dir``; a missing optional
    package is an ImportError naming its pip extra."""
    return [LOGGER_CLASSES[name](run_dir) for name in names]
