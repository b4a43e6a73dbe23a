"""Callbacks: what the training loop does besides training, as hooks on :class:`Trainer`.

The loop (:mod:`equimodal.engine.trainer`) trains, validates and keeps the best model by
validation accuracy; everything else — checkpoints, early stopping, the run folder's
files, the progress display, logging — is a :class:`Callback`. The trainer installs the
built-in ones its arguments ask for and then the user's, and calls each hook on every
callback in that order:

================================  ===============================================
hook                              when
================================  ===============================================
``on_fit_start(trainer, state)``  model, optimizer and strategy built; resume state
                                  loaded; before the first epoch (also on resume)
``on_epoch_start(trainer, state)``before the batches of ``state.epoch``
``on_batch_end(trainer, state,    after each training step, with its logged losses
logs)``
``on_validation_end(trainer,      after validation of the epoch, with its report;
state, report)``                  ``state.improved`` says whether it is the best so
                                  far (the strategy has not yet seen the report)
``on_epoch_end(trainer, state,    the epoch's history row is complete (the strategy
row)``                            has seen the report); a callback may set
                                  ``state.should_stop``
``on_fit_end(trainer, state,      the best model is restored and scored on test;
metrics)``                        ``metrics`` is what ``metrics.json`` holds
================================  ===============================================

Under torchrun the hooks run on rank 0 only (the process that evaluates and writes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from equimodal.config import dump_config
from equimodal.core.files import dumps_json, write_json_atomic, write_text_atomic
from equimodal.engine.build import library_versions, rng_state
from equimodal.engine.checkpoint import save_checkpoint

if TYPE_CHECKING:
    from equimodal.data.base import DatasetInfo
    from equimodal.engine.strategy import Strategy
    from equimodal.engine.validation import SplitReport

#: the :class:`~equimodal.engine.trainer.Trainer` running the hooks (typed loosely here:
#: the trainer imports this module, not the other way round)
Trainer = Any


@dataclass
class FitState:
    """The loop's state that callbacks read (and, where documented, change).

    ``best_key`` is (validation accuracy, validation loss) of the best epoch; ``stale`` the
    epochs since it (restarted when a strategy starts a new stage); ``should_stop`` ends the
    loop after the current epoch. ``history`` holds one row per epoch (row 0: before
    training). ``splits`` are the train, val and test splits on the training device.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    strategy: Strategy
    info: DatasetInfo
    epochs: int
    splits: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    first_epoch: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    best_key: tuple[float, float] = (-1.0, float("inf"))
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    best_strategy: dict[str, Any] = field(default_factory=dict)
    improved: bool = False
    stale: int = 0
    should_stop: bool = False
    resumed: bool = False
    started: float = field(default_factory=time.perf_counter)
    earlier_seconds: float = 0.0

    @property
    def train_seconds(self) -> float:
        """Training wall time so far, including the epochs before a resume."""
        return self.earlier_seconds + time.perf_counter() - self.started

    def checkpoint_meta(self) -> dict[str, Any]:
        """The metadata stored with every checkpoint of this run at the current epoch."""
        return {
            "epoch": self.epoch,
            "strategy": self.strategy.name,
            "strategy_state": self.strategy.state_dict(),
            "modalities": list(self.info.modality_names),
            "num_classes": self.info.num_classes,
            "dataset": self.info.name,
            "versions": library_versions(),
        }

    def resume_meta(self) -> dict[str, Any]:
        """What ``--resume`` needs to continue after the current epoch exactly."""
        return {
            "epoch": self.epoch,
            "history": self.history,
            "best_key": list(self.best_key),
            "best_epoch": self.best_epoch,
            "best_strategy": self.best_strategy,
            "stale": self.stale,
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": rng_state(),
            # disk-backed splits draw their order from their pass count
            "passes": {n: sp.passes for n, sp in self.splits.items() if hasattr(sp, "passes")},
            "train_seconds": self.train_seconds,
        }


class Callback:
    """Base class of callbacks: override the hooks you need (see the module doc)."""

    def on_fit_start(self, trainer: Trainer, state: FitState) -> None:
        """Before the first epoch."""

    def on_epoch_start(self, trainer: Trainer, state: FitState) -> None:
        """Before the batches of ``state.epoch``."""

    def on_batch_end(self, trainer: Trainer, state: FitState, logs: dict[str, float]) -> None:
        """After each training step (``logs``: its losses)."""

    def on_validation_end(self, trainer: Trainer, state: FitState, report: SplitReport) -> None:
        """After the epoch's validation; ``state.improved`` is set."""

    def on_epoch_end(self, trainer: Trainer, state: FitState, row: dict[str, Any]) -> None:
        """The epoch's history row is complete; may set ``state.should_stop``."""

    def on_fit_end(self, trainer: Trainer, state: FitState, metrics: dict[str, Any]) -> None:
        """Test is scored; ``metrics`` is the run's final metrics."""


class LambdaCallback(Callback):
    """A callback from a plain function called with each epoch's history row."""

    def __init__(self, on_epoch: Callable[[dict[str, Any]], None]) -> None:
        self.on_epoch = on_epoch

    def on_epoch_end(self, trainer: Trainer, state: FitState, row: dict[str, Any]) -> None:
        self.on_epoch(row)


class EarlyStopping(Callback):
    """Stop when validation has not improved for ``patience`` epochs (None: never).

    The count restarts when the strategy starts a new training stage
    (``Strategy.restarts_patience``, e.g. ``udi``'s followers after its anchor).
    """

    def __init__(self, patience: int | None) -> None:
        self.patience = patience

    def on_epoch_end(self, trainer: Trainer, state: FitState, row: dict[str, Any]) -> None:
        state.stale = 0 if state.improved else state.stale + 1
        if state.strategy.restarts_patience():
            state.stale = 0
        if self.patience is not None and state.stale >= self.patience:
            state.should_stop = True


class Checkpointing(Callback):
    """``RUN/checkpoints/best.safetensors`` at each new best epoch (selected on validation)
    and ``last.safetensors`` after every epoch, with everything ``--resume`` needs."""

    def __init__(self, run_dir: str | Path) -> None:
        self.folder = Path(run_dir) / "checkpoints"

    def on_fit_start(self, trainer: Trainer, state: FitState) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def on_validation_end(self, trainer: Trainer, state: FitState, report: SplitReport) -> None:
        if state.improved:
            save_checkpoint(self.folder / "best.safetensors", state.model, state.checkpoint_meta())

    def on_epoch_end(self, trainer: Trainer, state: FitState, row: dict[str, Any]) -> None:
        # the checkpoint is the truth a resume starts from; history.jsonl is rewritten from
        # it, so a kill between the two writes is harmless
        meta = state.checkpoint_meta()
        meta["resume"] = state.resume_meta()
        save_checkpoint(self.folder / "last.safetensors", state.model, meta, state.optimizer)


class RunFiles(Callback):
    """The run folder's text files: ``config.yaml`` at the start, ``history.jsonl`` after
    every epoch (rewritten whole, from the checkpointed history on resume) and
    ``metrics.json`` at the end."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def _write_history(self, state: FitState) -> None:
        write_text_atomic(
            self.run_dir / "history.jsonl", "".join(dumps_json(r) + "\n" for r in state.history)
        )

    def on_fit_start(self, trainer: Trainer, state: FitState) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_dir / "config.yaml", dump_config(trainer.config))
        if state.resumed:  # drop rows of an epoch whose checkpoint was not written
            self._write_history(state)

    def on_epoch_end(self, trainer: Trainer, state: FitState, row: dict[str, Any]) -> None:
        self._write_history(state)

    def on_fit_end(self, trainer: Trainer, state: FitState, metrics: dict[str, Any]) -> None:
        write_json_atomic(self.run_dir / "metrics.json", metrics)


class ProgressBar(Callback):
    """A rich progress display: one bar over epochs (loss, validation accuracy, the order)
    and one over the current epoch's batches, each with its time left."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task: Any = None
        self.batch_task: Any = None

    def on_fit_start(self, trainer: Trainer, state: FitState) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "training", total=state.epochs, completed=state.first_epoch - 1
        )

    def on_epoch_start(self, trainer: Trainer, state: FitState) -> None:
        if self.progress is None:
            return
        context = getattr(state.strategy, "ctx", None)
        total = getattr(context, "batches_per_epoch", None)  # None: an open-ended bar
        description = f"  epoch {state.epoch} batches"
        if self.batch_task is None:
            self.batch_task = self.progress.add_task(description, total=total)
        else:
            self.progress.reset(self.batch_task, total=total, description=description)

    def on_batch_end(self, trainer: Trainer, state: FitState, logs: dict[str, float]) -> None:
        if self.progress is not None and self.batch_task is not None:
            self.progress.advance(self.batch_task)

    def on_epoch_end(self, trainer: Trainer, state: FitState, row: dict[str, Any]) -> None:
        if self.progress is None:
            return
        loss = row["train"].get("loss", float("nan"))
        acc = 100 * row["val"]["accuracy"]
        text = (
            f"epoch {state.epoch} loss {loss:.3f} val {acc:.1f}% "
            f"(best {100 * state.best_key[0]:.1f}%)"
        )
        if "order" in row:
            text += " order " + ">".join(row["order"])
        self.progress.update(self.task, advance=1, description=text)

    def close(self) -> None:
        """Stop the display (the trainer calls it when the loop ends, also on error)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
