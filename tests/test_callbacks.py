"""The trainer's callbacks: hook order, user callbacks, early stopping, the run files."""

from __future__ import annotations

import json

from equimodal.engine.callbacks import Callback, EarlyStopping, FitState
from equimodal.engine.trainer import Trainer


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.batches = 0

    def on_fit_start(self, trainer, state):
        self.calls.append(("fit_start", state.epoch))

    def on_epoch_start(self, trainer, state):
        self.calls.append(("epoch_start", state.epoch))

    def on_batch_end(self, trainer, state, logs):
        assert "loss" in logs
        self.batches += 1

    def on_validation_end(self, trainer, state, report):
        self.calls.append(("validation_end", state.epoch))
        # the best model is chosen before the strategy sees the report
        assert state.improved == (state.best_epoch == state.epoch)

    def on_epoch_end(self, trainer, state, row):
        assert row["epoch"] == state.epoch and state.history[-1] is row
        self.calls.append(("epoch_end", state.epoch))

    def on_fit_end(self, trainer, state, metrics):
        self.calls.append(("fit_end", metrics["best_epoch"]))


def test_user_callbacks_see_every_hook_in_order(small_config):
    recorder = Recorder()
    result = Trainer(
        small_config("joint", epochs=2, extra=["train.patience=null"]),
        progress=False,
        callbacks=[recorder],
    ).fit()
    per_epoch = ["epoch_start", "validation_end", "epoch_end"]
    assert [c for c, _ in recorder.calls] == ["fit_start", *per_epoch, *per_epoch, "fit_end"]
    assert [e for c, e in recorder.calls if c == "epoch_end"] == [1, 2]
    assert recorder.calls[-1] == ("fit_end", result.metrics["best_epoch"])
    assert recorder.batches >= 2  # at least one batch per epoch


def test_a_callback_can_stop_training(small_config):
    class StopAfterTwo(Callback):
        def on_epoch_end(self, trainer, state, row):
            if state.epoch == 2:
                state.should_stop = True

    result = Trainer(
        small_config("joint", epochs=10, extra=["train.patience=null"]),
        progress=False,
        callbacks=[StopAfterTwo()],
    ).fit()
    assert result.metrics["epochs_run"] == 2


def test_early_stopping_counts_epochs_without_improvement():
    class FakeStrategy:
        restarted = False

        def restarts_patience(self):
            return self.restarted

    state = FitState(
        model=None, optimizer=None, scheduler=None, strategy=FakeStrategy(), info=None, epochs=9
    )
    stopper = EarlyStopping(patience=2)
    for improved, stop in ((True, False), (False, False), (False, True)):
        state.improved = improved
        stopper.on_epoch_end(None, state, {})
        assert state.should_stop == stop
    state.should_stop, state.strategy.restarted = False, True  # a new stage: count anew
    stopper.on_epoch_end(None, state, {})
    assert state.stale == 0 and not state.should_stop
    never = EarlyStopping(patience=None)
    state.strategy.restarted = False
    for _ in range(5):
        never.on_epoch_end(None, state, {})
    assert state.stale == 5 and not state.should_stop


def test_run_files_are_written_by_the_builtin_callbacks(small_config, tmp_path):
    config = small_config("joint", epochs=2, extra=["train.patience=null"])
    Trainer(config, run_dir=tmp_path / "run", progress=False).fit()
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "metrics.json").is_file()
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert (run / "checkpoints" / "best.safetensors").is_file()
    assert (run / "checkpoints" / "last.safetensors").is_file()


def test_progress_bar_counts_each_epochs_batches_with_time_left(small_config):
    import io

    from rich.console import Console

    from equimodal.engine.callbacks import ProgressBar

    class Kept(ProgressBar):
        """Keeps the batch counts the bar showed at each epoch's end."""

        shown: list[tuple[float, float | None]] = []

        def on_epoch_end(self, trainer, state, row):
            task = self.progress.tasks[1]
            self.shown.append((task.completed, task.total))
            super().on_epoch_end(trainer, state, row)

    out = io.StringIO()
    bar = Kept(Console(file=out, width=120, force_terminal=True))
    config = small_config("joint", epochs=2)
    Trainer(config, progress=False, callbacks=[bar]).fit()
    batches = -(-int(600 * 0.8 * 0.9) // 64)  # ceil(train rows / batch size), synthetic split
    assert [total for _, total in bar.shown] == [bar.shown[0][1]] * 2
    assert all(done == total for done, total in bar.shown)
    assert bar.shown[0][1] in (batches - 1, batches, batches + 1)
    assert "left" in out.getvalue() and "epoch 2 batches" in out.getvalue()


def test_relative_edm_announces_each_unimodal_run(small_config, capsys):
    from equimodal.analysis import fit_run

    config = small_config("joint", epochs=1, extra=["train.relative_edm=true"])
    fit_run(Trainer(config, progress=True))
    err = capsys.readouterr().err
    for k, m in enumerate(["m0", "m1", "m2"], start=1):
        assert f"stand-alone ability of {m}, unimodal run {k} of 3" in err
