"""The one training loop: epochs, validation, Shapley measurement, selection.

Every method runs through :class:`Trainer`; what differs between methods lives in its
Strategy's hooks, and everything the loop does besides training, validating and keeping
the best model (checkpoints, early stopping, the run folder's files, progress, logging)
is a callback (:mod:`equimodal.engine.callbacks`). Model selection and early stopping
read the validation split only; the test split is scored once, at the end, by the
selected model.

Launched by ``torchrun`` with several processes, the same loop trains one global batch
split across the ranks (``equimodal.engine.distributed``): rank 0 evaluates, decides and
runs the callbacks; the others train their shards and follow its decisions.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from equimodal.config import RunConfig
from equimodal.data.base import FeatureSplit, MultimodalData
from equimodal.data.registry import load_dataset
from equimodal.engine.build import (
    build_model,
    build_optimizer,
    build_scheduler,
    library_versions,
    plugin_modules,
    record_user_modules,
    seed_everything,
    select_device,
    set_rng_state,
)
from equimodal.engine.callbacks import (
    Callback,
    Checkpointing,
    EarlyStopping,
    FitState,
    LambdaCallback,
    ProgressBar,
    RunFiles,
)
from equimodal.engine.checkpoint import CheckpointError, load_model_state, read_checkpoint
from equimodal.engine.distributed import Distributed
from equimodal.engine.loggers import Logger, build_loggers
from equimodal.engine.runs import load_run, remove_run_dir
from equimodal.engine.strategy import Strategy, TrainContext, build_strategy
from equimodal.engine.validation import (
    SplitReport,
    class_prior,
    encode_split,
    evaluate_cache,
    order_set_gap,
)
from equimodal.models.model import MultimodalModel

__all__ = [
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "build_model",
    "load_run",
    "remove_run_dir",
    "select_device",
]


class TrainingDiverged(RuntimeError):
    """A training loss became NaN or infinite; the message names the epoch, the batch and
    the last good checkpoint."""


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns: the final metrics and the run folder."""

    metrics: dict[str, Any]
    run_dir: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    model: MultimodalModel | None = None
    strategy: Strategy | None = None


def _split_to(split, device: torch.device):
    if device.type == "cpu":
        return split
    if not isinstance(split, FeatureSplit):  # read from disk: batches move, not the split
        return split.to(device)
    return FeatureSplit(
        {m: x.to(device) for m, x in split.features.items()},
        split.labels.to(device),
        split.indices.to(device),
        {m: p.to(device) for m, p in split.present.items()},
    )


class Trainer:
    """Trains one run described by a :class:`RunConfig`.

    ``run_dir`` None keeps everything in memory (tests, notebooks); otherwise the folder
    receives ``config.yaml``, ``history.jsonl``, ``metrics.json`` and ``checkpoints/``,
    and the experiment trackers of ``train.loggers`` (:mod:`equimodal.engine.loggers`)
    write there; without a run folder they log nothing.
    ``callbacks`` are the user's own (:class:`~equimodal.engine.callbacks.Callback`),
    called after the built-in ones; ``on_epoch`` is a shortcut for a callback that gets
    each epoch's history row. Under ``torchrun`` only rank 0 writes and runs callbacks,
    and :meth:`fit` returns rank 0's metrics and history on every rank.
    """

    def __init__(
        self,
        config: RunConfig,
        data: MultimodalData | None = None,
        run_dir: str | Path | None = None,
        progress: bool = True,
        console: Console | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        resume: bool = False,
        callbacks: Sequence[Callback] = (),
        encoders: Mapping[str, torch.nn.Module] | None = None,
    ) -> None:
        self.encoders = dict(encoders or {})
        self.config = _record_origins(record_user_modules(config, self.encoders), run_dir)
        self.data = data
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.show_progress = progress
        self.console = console or Console(stderr=True)
        self.on_epoch = on_epoch
        self.user_callbacks = list(callbacks)
        if resume and self.run_dir is None:
            raise ValueError("resume needs the run folder of the interrupted run")
        self.resume = resume
        self.model: MultimodalModel | None = None
        self.strategy: Strategy | None = None
        self.state: FitState | None = None
        #: True once the first training epoch has begun (or a resumed run continues):
        #: from then on a failure keeps the run folder
        self.training_started = False
        #: set by fit from train.precision and train.channels_last (precision_setup)
        self.autocast: Callable[[], Any] = contextlib.nullcontext
        self.channels_last = False

    # ------------------------------------------------------------------ callbacks
    def build_callbacks(self, main: bool) -> list[Callback]:
        """The callbacks of this fit, in call order: built-ins, then the user's."""
        if not main:
            return []
        callbacks: list[Callback] = [EarlyStopping(self.config.train.patience)]
        if self.run_dir is not None:
            callbacks += [Checkpointing(self.run_dir), RunFiles(self.run_dir)]
            callbacks += build_loggers(self.config.train.loggers, self.run_dir)
        elif self.config.train.loggers:
            warnings.warn(
                f"train.loggers {self.config.train.loggers} log nothing: the run has no run "
                "folder (Trainer(run_dir=...))",
                stacklevel=2,
            )
        if self.on_epoch is not None:
            callbacks.append(LambdaCallback(self.on_epoch))
        callbacks += self.user_callbacks
        if self.show_progress:
            callbacks.append(ProgressBar(self.console))
        return callbacks

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, self.state, *args)

    # ------------------------------------------------------------------ helpers
    def _evaluate(
        self,
        model,
        strategy,
        split_name: str,
        split,
        prior,
        device,
        epoch: int | None = None,
        order_gap: bool = False,
    ) -> SplitReport:
        """Score ``split``; ``epoch`` (per-epoch validation) seeds the permutations of a
        sampled Shapley estimate anew each epoch, from (seed, epoch); the final scores use
        the run's seed. ``order_gap`` adds the all-orders accuracy (:func:`order_set_gap`)."""
        tc = self.config.train
        seed = self.config.seed if epoch is None else epoch_seed(self.config.seed, epoch)
        cache = encode_split(model, split, batch_size=tc.eval_batch_size, device=device)
        if split_name == "val":
            # only validation may tune how the model predicts; test reuses what val chose
            strategy.prepare_inference(cache)
        report = evaluate_cache(
            model,
            cache,
            split_name,
            prior,
            inference=strategy.inference_kwargs(),
            value_kind=strategy.schedule_value,
            max_exact=tc.shapley.max_exact,
            permutations=tc.shapley.permutations,
            seed=seed,
            batch_size=tc.eval_batch_size,
            shapley_inference=strategy.schedule_inference() if epoch is not None else None,
        )
        if order_gap:
            report.order_gap = order_set_gap(
                model, cache, strategy.inference_kwargs(), batch_size=tc.eval_batch_size
            )
        return report

    # ------------------------------------------------------------------ main
    def fit(self) -> TrainResult:
        """Train, select on validation, score test once; returns the final metrics."""
        cfg = self.config
        seed_everything(cfg.seed, cfg.train.deterministic)
        data = self.data or load_dataset(cfg.dataset.name, seed=cfg.seed, **cfg.dataset.options)
        group, device = Distributed.setup(select_device(cfg.train.device))
        self.callbacks = self.build_callbacks(group.is_main)
        try:
            return self._fit(data, device, group)
        finally:
            for callback in self.callbacks:
                if isinstance(callback, (ProgressBar, Logger)):
                    callback.close()
            group.close()

    def _fit(self, data: MultimodalData, device: torch.device, group: Distributed) -> TrainResult:
        cfg, tc = self.config, self.config.train
        info = data.info
        main = group.is_main
        seed_everything(cfg.seed, tc.deterministic)
        model = build_model(cfg, info, self.encoders).to(device)
        self.autocast, scaler, self.channels_last = precision_setup(tc, device, model)
        self.model = model  # readable from callbacks
        optimizer = build_optimizer(cfg, model)
        scheduler = build_scheduler(cfg, optimizer)
        strategy = build_strategy(cfg.strategy)
        self.strategy = strategy
        group.check_strategy(strategy)
        group.broadcast_model(model)  # identical start on every rank
        group.seed_rank(cfg.seed)
        splits = {name: _split_to(data.split(name), device) for name in ("train", "val", "test")}
        # batch norm cannot train on a shard of one row (torchrun only)
        min_rows = 2 if group.active and _has_batch_norm(model) else 1
        strategy.setup(
            TrainContext(
                model=model,
                optimizer=optimizer,
                modalities=info.modality_names,
                num_classes=info.num_classes,
                seed=cfg.seed,
                grad_clip=cfg.optim.grad_clip,
                batches_per_epoch=group.batches_per_epoch(
                    len(splits["train"]), tc.batch_size, min_rows
                ),
                scaler=scaler,
            )
        )
        for name, split in splits.items():
            if len(split) == 0 and (name != "test" or tc.score_test):
                raise ValueError(f"dataset {info.name!r}: the {name} split is empty")
        train, val, test = splits["train"], splits["val"], splits["test"]
        prior = class_prior(data.train.labels, info.num_classes)
        state = self.state = FitState(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            strategy=strategy,
            info=info,
            epochs=tc.epochs,
            splits=splits,
            best_strategy=strategy.state_dict(),
        )
        resumed = self._load_resume(model, optimizer, scheduler, strategy) if self.resume else None
        model.train()
        if resumed is None:
            self._call("on_fit_start")
            if main:
                initial = self._evaluate(model, strategy, "val", val, prior, device, epoch=0)
                state.history.append({"epoch": 0, "val": initial.to_dict(), **strategy.epoch_log()})
            self._follow(group, strategy)
        else:
            self._restore(state, resumed, splits)
            self.training_started = True  # a resumed run has a checkpoint to keep
            self._call("on_fit_start")
            set_rng_state(resumed["rng"])  # last: the state right after the saved epoch
        self.training_started = True
        for epoch in range(state.first_epoch, tc.epochs + 1):
            state.epoch = epoch
            train_logs, train_time = self._train_epoch(state, train, group, min_rows)
            group.sync_buffers(model)
            if main:
                self._validate_epoch(state, val, prior, device, train_logs, train_time)
            if group.active:
                # rank 0's decisions and strategy state (e.g. the next modality order)
                state.improved, state.should_stop = self._follow(
                    group, strategy, (state.improved, state.should_stop)
                )
                if state.improved and not main:
                    state.best_state = _clone(model)
            if state.should_stop:
                break
        return self._finish(state, val, test, prior, device, group)

    def _train_epoch(
        self, state: FitState, train, group: Distributed, min_rows: int
    ) -> tuple[dict[str, float], float]:
        """One epoch of training steps; returns the mean logs and the wall time."""
        cfg, tc, epoch = self.config, self.config.train, state.epoch
        t0 = time.perf_counter()
        state.model.train()
        state.strategy.on_epoch_start(epoch)
        self._call("on_epoch_start")
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        sums: dict[str, float] = {}
        count = 0
        for batch, shard in group.train_batches(
            train, tc.batch_size, generator, tc.missing_rate, min_rows
        ):
            if self.channels_last:
                batch.inputs = {m: to_channels_last(x) for m, x in batch.inputs.items()}
            with group.step(shard), self.autocast():
                logs = state.strategy.training_step(batch)
            self._check_finite(logs, epoch, count + 1)
            for k, v in logs.items():
                # under torchrun: this rank's share of the global batch's value
                sums[k] = sums.get(k, 0.0) + (v if shard is None else v * shard.weight)
            count += 1
            self._call("on_batch_end", logs)
        sums = group.sum_logs(sums)
        if state.scheduler is not None:
            state.scheduler.step()
        return {k: v / max(count, 1) for k, v in sums.items()}, time.perf_counter() - t0

    def _check_finite(self, logs: dict[str, float], epoch: int, batch: int) -> None:
        """Stop with :class:`TrainingDiverged` when a logged loss is NaN or infinite."""
        bad = [k for k, v in logs.items() if k.startswith("loss") and not math.isfinite(v)]
        if not bad:
            return
        last = self.run_dir / "checkpoints" / "last.safetensors" if self.run_dir else None
        if epoch > 1 and last is not None:
            where = f"the last good checkpoint is {last} (end of epoch {epoch - 1})"
        elif epoch > 1:
            where = "no checkpoint is kept (no run folder)"
        else:
            where = "no epoch finished, so there is no checkpoint"
        raise TrainingDiverged(
            f"training diverged: {bad[0]} is {logs[bad[0]]} at epoch {epoch}, batch {batch}; "
            f"{where} (a lower optim.lr or an optim.grad_clip may help)"
        )

    def _validate_epoch(
        self, state: FitState, val, prior, device, train_logs: dict[str, float], train_time: float
    ) -> None:
        """Rank 0: score validation, keep the best model, let the strategy and the
        callbacks see the epoch."""
        model, strategy = state.model, state.strategy
        t1 = time.perf_counter()
        report = self._evaluate(model, strategy, "val", val, prior, device, epoch=state.epoch)
        row = {
            "epoch": state.epoch,
            "train": train_logs,
            "val": report.to_dict(),
            "lr": state.optimizer.param_groups[0]["lr"],
            "train_time_s": round(train_time, 4),
            "eval_time_s": round(time.perf_counter() - t1, 4),
        }
        key = (report.accuracy, report.loss)
        best = state.best_key
        state.improved = key[0] > best[0] or (key[0] == best[0] and key[1] < best[1])
        if state.improved:
            state.best_key, state.best_epoch = key, state.epoch
            state.best_state = _clone(model)
            state.best_strategy = strategy.state_dict()
        self._call("on_validation_end", report)
        strategy.on_epoch_end(state.epoch, report)
        if strategy.restarts_selection():
            # the new stage's epochs compete among themselves; the best so far stays
            # selected until one of them is scored
            state.best_key = (-1.0, float("inf"))
        row.update(strategy.epoch_log())
        row["best"] = state.improved
        state.history.append(row)
        self._call("on_epoch_end", row)

    def _finish(self, state: FitState, val, test, prior, device, group) -> TrainResult:
        """Restore the best model, score validation and test once, build the metrics."""
        cfg, model, strategy = self.config, state.model, state.strategy
        train_seconds = state.train_seconds
        if state.best_state is not None:
            model.load_state_dict(state.best_state)
            if group.is_main:
                strategy.load_state_dict(state.best_strategy)
        metrics: dict[str, Any] = {}
        if group.is_main:
            t2 = time.perf_counter()
            final = {"prior": prior, "device": device, "order_gap": True}
            val_dict = self._evaluate(model, strategy, "val", val, **final).to_dict()
            test_dict = (
                self._evaluate(model, strategy, "test", test, **final).to_dict()
                if cfg.train.score_test
                else {}  # a tuning run: test is never read
            )
            metrics = {
                "run": cfg.run_name(),
                "dataset": state.info.name,
                "strategy": strategy.name,
                "fusion": cfg.model.fusion,
                "seed": cfg.seed,
                "modalities": list(state.info.modality_names),
                "best_epoch": state.best_epoch,
                "epochs_run": len(state.history) - 1,
                "train_time_s": round(train_seconds, 3),
                "final_eval_time_s": round(time.perf_counter() - t2, 3),
                "inference": _jsonable(strategy.inference_kwargs()),
                "val": val_dict,
                "test": test_dict,
                "versions": library_versions(),
                # float rounding depends on them: the same machine type, threads and seed
                # give bit-identical results
                "threads": torch.get_num_threads(),
                "device": str(device),
            }
            if group.active:
                metrics["world_size"] = group.world
            self._call("on_fit_end", metrics)
        history = state.history
        if group.active:
            metrics, history = self._follow(group, strategy, (metrics, history))
        return TrainResult(
            metrics=metrics,
            run_dir=self.run_dir if group.is_main else None,
            history=history,
            model=model,
            strategy=strategy,
        )

    # ------------------------------------------------------------------ resume
    def _load_resume(self, model, optimizer, scheduler, strategy: Strategy) -> dict[str, Any]:
        """Restore model, optimizer, scheduler and strategy from ``last.safetensors``.

        Returns the loop's state at the end of the last complete epoch (history, best so
        far, patience, RNG states, data passes), with the best model's tensors.
        """
        assert self.run_dir is not None
        path = self.run_dir / "checkpoints" / "last.safetensors"
        if not path.is_file():
            raise FileNotFoundError(
                f"cannot resume {str(self.run_dir)!r}: {str(path)!r} does not exist "
                "(the run stopped before its first epoch ended; start it again)"
            )
        tensors, meta, optim_state = read_checkpoint(path)
        saved = meta.get("resume")
        if not isinstance(saved, dict) or optim_state is None:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds no resume state (written by an older equimodal)"
            )
        if meta.get("strategy") != strategy.name:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is of strategy {meta.get('strategy')!r}, the run's "
                f"config.yaml says {strategy.name!r}"
            )
        load_model_state(model, tensors, str(path))
        try:
            optimizer.load_state_dict(optim_state)
        except ValueError as err:  # e.g. the model's parameters were regrouped since
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds an optimizer state this equimodal cannot "
                f"continue ({err}); start the run again"
            ) from None
        if scheduler is not None and saved.get("scheduler") is not None:
            scheduler.load_state_dict(saved["scheduler"])
        strategy.load_state_dict(meta.get("strategy_state", {}))
        saved["best_state"] = None
        best_path = self.run_dir / "checkpoints" / "best.safetensors"
        if best_path.is_file():
            best_tensors, best_meta, _ = read_checkpoint(best_path)
            # a best checkpoint from a later epoch (killed before last.safetensors was
            # written) is left aside: the resumed run recomputes that epoch
            if int(best_meta.get("epoch", -1)) == int(saved["best_epoch"]):
                saved["best_state"] = best_tensors
        return saved

    def _restore(self, state: FitState, saved: dict[str, Any], splits: dict[str, Any]) -> None:
        state.resumed = True
        state.history = saved["history"]
        accuracy, loss = saved["best_key"]  # strict JSON keeps an infinite loss as null
        state.best_key = (float(accuracy), math.inf if loss is None else float(loss))
        state.best_state, state.best_strategy = saved["best_state"], saved["best_strategy"]
        state.best_epoch, state.stale = int(saved["best_epoch"]), int(saved["stale"])
        state.epoch = int(saved["epoch"])
        state.first_epoch = state.epoch + 1
        state.earlier_seconds = float(saved.get("train_seconds", 0.0))
        for name, passes in saved.get("passes", {}).items():
            if hasattr(splits[name], "passes"):
                splits[name].passes = int(passes)
        patience = self.config.train.patience
        if patience is not None and state.stale >= patience:
            state.first_epoch = self.config.train.epochs + 1  # it had stopped early

    @staticmethod
    def _follow(group: Distributed, strategy: Strategy, payload: Any = None) -> Any:
        """Under torchrun: rank 0's ``payload`` and strategy state on every rank."""
        if not group.active:
            return payload
        state, payload = group.broadcast_object((strategy.state_dict(), payload))
        if not group.is_main:
            strategy.load_state_dict(state)
        return payload


def _record_origins(config: RunConfig, run_dir: str | Path | None) -> RunConfig:
    """``config`` with the modules that registered its plugins added to ``imports``;
    warns when a saved run uses a part registered in a script (it cannot be reloaded)."""
    modules, scripts = plugin_modules(config)
    if scripts and run_dir is not None:
        warnings.warn(
            f"the run uses {', '.join(scripts)}, registered in your script: `equimodal "
            "evaluate` and the other commands cannot rebuild it (register it in an "
            "importable module, or register it again before load_run)",
            stacklevel=3,
        )
    missing = [m for m in modules if m not in config.imports]
    if not missing:
        return config
    return config.model_copy(update={"imports": [*config.imports, *missing]})


def precision_setup(tc, device: torch.device, model: torch.nn.Module):
    """``(autocast, scaler, channels_last)`` for ``train.precision`` and
    ``train.channels_last``: a context factory wrapping each training step, the fp16
    gradient scaler (None otherwise), and whether 4-d inputs go channels-last (the model's
    convolutions are converted here). Validation never autocasts: Shapley values and EDM
    are computed in fp32."""
    precision = tc.precision
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"train.precision fp16 needs a CUDA device (a gradient scaler keeps fp16 "
            f"gradients from underflowing); this run is on {device.type}: use bf16 or fp32"
        )
    if precision == "fp32":
        autocast = contextlib.nullcontext
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16

        def autocast():
            return torch.autocast(device_type=device.type, dtype=dtype)

    scaler = None
    if precision == "fp16":  # torch.amp.GradScaler from torch 2.3, torch.cuda.amp before
        amp_scaler = getattr(torch.amp, "GradScaler", None)
        scaler = amp_scaler("cuda") if amp_scaler is not None else torch.cuda.amp.GradScaler()
    has_conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    wanted = tc.channels_last is True or (tc.channels_last == "auto" and device.type == "cuda")
    channels_last = wanted and has_conv
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return autocast, scaler, channels_last


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 4-d image or spectrogram batch in channels-last layout (others unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed of its own for each (run seed, epoch), e.g. for sampled Shapley permutations."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _clone(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _has_batch_norm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
