"""Interrupting a run where a crash would, and comparing runs with their times left out."""

from __future__ import annotations

from typing import Any

from equimodal.engine.callbacks import Callback


class Killed(RuntimeError):
    """The crash :class:`KillAt` raises."""


class KillAt(Callback):
    """Raises :class:`Killed` inside ``batch`` of ``epoch``, as a crash would."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch, self.seen = epoch, batch, 0

    def on_epoch_start(self, trainer, state):
        self.seen = 0

    def on_batch_end(self, trainer, state, logs):
        self.seen += 1
        if state.epoch == self.epoch and self.seen == self.batch:
            raise Killed


def strip_times(obj: Any) -> Any:
    """``obj`` without the wall-clock entries (keys ending in ``time_s``), recursively."""
    if isinstance(obj, dict):
        return {k: strip_times(v) for k, v in obj.items() if not k.endswith("time_s")}
    if isinstance(obj, list):
        return [strip_times(v) for v in obj]
    return obj
