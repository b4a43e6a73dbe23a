"""The one training loop: epochs, validation, Shapley measurement, selection, files.

Every method runs through :class:`Trainer`; what differs between methods lives in its
Strategy's hooks. Model selection and early stopping read the validation split only; the
test split is scored once, at the end, by the selected checkpoint.

Launched by ``torchrun`` with several processes, the same loop trains one global batch
split across the ranks (``equimodal.engine.distributed``): rank 0 evaluates, decides and
writes files; the others train their shards and follow its decisions.
"""

from __future__ import annotations

import base64
import json
import platform
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import equimodal
from equimodal.config import RunConfig, dump_config
from equimodal.data.base import DatasetInfo, FeatureSplit, MultimodalData
from equimodal.data.registry import load_dataset
from equimodal.engine.checkpoint import (
    CheckpointError,
    load_model_state,
    read_checkpoint,
    save_checkpoint,
)
from equimodal.engine.distributed import Distributed
from equimodal.engine.files import write_json_atomic, write_text_atomic
from equimodal.evaluate import SplitReport, class_prior, encode_split, evaluate_cache
from equimodal.models.model import MultimodalModel
from equimodal.strategies import Strategy, TrainContext, build_strategy


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; make torch kernels deterministic when asked."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's (CPU, CUDA) random states as JSON-serialisable data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    if torch.cuda.is_available():
        state["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode("ascii")
            for s in torch.cuda.get_rng_state_all()
        ]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""

    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(t) for t in state["cuda"]])


def build_model(config: RunConfig, info: DatasetInfo) -> MultimodalModel:
    """The model a config describes, for the modalities of ``info``."""
    mc = config.model
    unknown = [m for m in mc.encoders if m not in info.modality_names]
    if unknown:
        raise ValueError(
            f"model.encoders names modality {unknown[0]!r}, which dataset {info.name!r} lacks "
            f"(it has {', '.join(info.modality_names)})"
        )
    encoders = {
        spec.name: (enc.kind, enc.options())
        for spec in info.modalities
        for enc in [mc.encoders.get(spec.name, mc.encoder)]
    }
    fusion_options = mc.memory.model_dump() if mc.fusion == "memory" else {}
    return MultimodalModel(
        info.modalities,
        info.num_classes,
        dim=mc.dim,
        fusion=mc.fusion or "concat",
        encoders=encoders,
        fusion_options=fusion_options,
    )


def build_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``config.optim`` over all model parameters."""
    oc = config.optim
    params = list(model.parameters())
    if oc.name in ("adamw", "adam"):
        kind = torch.optim.AdamW if oc.name == "adamw" else torch.optim.Adam
        if oc.fused:
            try:
                return kind(params, lr=oc.lr, weight_decay=oc.weight_decay, fused=True)
            except (RuntimeError, ValueError, TypeError):
                pass  # this torch or device has no fused kernel: the loop implementation
        return kind(params, lr=oc.lr, weight_decay=oc.weight_decay)
    return torch.optim.SGD(params, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay)


def build_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer):
    """The per-epoch learning-rate schedule of ``config.optim`` (None for ``none``)."""
    oc = config.optim
    if oc.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.train.epochs)
    if oc.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=oc.step_size, gamma=oc.gamma)
    return None


def library_versions() -> dict[str, str]:
    """Versions recorded with every run."""
    return {
        "equimodal": equimodal.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


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
    receives ``config.yaml``, ``history.jsonl``, ``metrics.json`` and ``checkpoints/``.
    Under ``torchrun`` only rank 0 writes (``run_dir`` is ignored on the other ranks), and
    :meth:`fit` returns rank 0's metrics and history on every rank.
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
    ) -> None:
        self.config = config
        self.data = data
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.show_progress = progress
        self.console = console or Console(stderr=True)
        self.on_epoch = on_epoch
        if resume and self.run_dir is None:
            raise ValueError("resume needs the run folder of the interrupted run")
        self.resume = resume

    # ------------------------------------------------------------------ helpers
    def _evaluate(
        self, model, strategy, split_name: str, split: FeatureSplit, prior, device
    ) -> SplitReport:
        tc = self.config.train
        cache = encode_split(model, split, batch_size=tc.eval_batch_size, device=device)
        if split_name == "val":
            # only validation may tune how the model predicts; test reuses what val chose
            strategy.prepare_inference(cache)
        return evaluate_cache(
            model,
            cache,
            split_name,
            prior,
            inference=strategy.inference_kwargs(),
            value_kind=getattr(strategy, "value_kind", "accuracy"),
            max_exact=tc.shapley.max_exact,
            permutations=tc.shapley.permutations,
            seed=self.config.seed,
            batch_size=tc.eval_batch_size,
        )

    def _meta(self, epoch: int, strategy: Strategy, info: DatasetInfo) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "strategy": strategy.name,
            "strategy_state": strategy.state_dict(),
            "modalities": list(info.modality_names),
            "num_classes": info.num_classes,
            "dataset": info.name,
            "versions": library_versions(),
        }

    # ------------------------------------------------------------------ main
    def fit(self) -> TrainResult:
        """Train, select on validation, score test once; returns the final metrics."""
        cfg = self.config
        seed_everything(cfg.seed, cfg.train.deterministic)
        data = self.data or load_dataset(cfg.dataset.name, seed=cfg.seed, **cfg.dataset.options)
        info = data.info
        group, device = Distributed.setup(select_device(cfg.train.device))
        try:
            return self._fit(data, info, device, group)
        finally:
            group.close()

    def _fit(
        self, data: MultimodalData, info: DatasetInfo, device: torch.device, group: Distributed
    ) -> TrainResult:
        cfg = self.config
        main = group.is_main
        run_dir = self.run_dir if main else None
        seed_everything(cfg.seed, cfg.train.deterministic)
        model = build_model(cfg, info).to(device)
        self.model = model  # readable from on_epoch callbacks
        optimizer = build_optimizer(cfg, model)
        scheduler = build_scheduler(cfg, optimizer)
        strategy = build_strategy(cfg.strategy)
        group.check_strategy(strategy)
        group.broadcast_model(model)  # identical start on every rank
        group.seed_rank(cfg.seed)
        ctx = TrainContext(
            model=model,
            optimizer=optimizer,
            modalities=info.modality_names,
            num_classes=info.num_classes,
            seed=cfg.seed,
            grad_clip=cfg.optim.grad_clip,
        )
        strategy.setup(ctx)
        train = _split_to(data.train, device)
        val = _split_to(data.val, device)
        test = _split_to(data.test, device)
        for name, split in (("train", train), ("val", val), ("test", test)):
            if len(split) == 0:
                raise ValueError(f"dataset {info.name!r}: the {name} split is empty")
        prior = class_prior(data.train.labels, info.num_classes)
        splits = {"train": train, "val": val, "test": test}
        resumed = self._load_resume(model, optimizer, scheduler, strategy) if self.resume else None

        ckpt_dir = None
        if run_dir is not None:
            ckpt_dir = run_dir / "checkpoints"
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / "config.yaml", dump_config(cfg))

        history: list[dict[str, Any]] = []
        started = time.perf_counter()
        model.train()
        best_key = (-1.0, float("inf"))
        best_state: dict[str, torch.Tensor] | None = None
        best_strategy: dict[str, Any] = strategy.state_dict()
        best_epoch = 0
        stale = 0
        first_epoch = 1
        earlier_seconds = 0.0
        if resumed is None:
            if main:
                initial = self._evaluate(model, strategy, "val", val, prior, device)
                history.append({"epoch": 0, "val": initial.to_dict(), **strategy.epoch_log()})
            self._follow(group, strategy)
        else:
            history = resumed["history"]
            best_key = (float(resumed["best_key"][0]), float(resumed["best_key"][1]))
            best_state, best_strategy = resumed["best_state"], resumed["best_strategy"]
            best_epoch, stale = int(resumed["best_epoch"]), int(resumed["stale"])
            first_epoch = int(resumed["epoch"]) + 1
            earlier_seconds = float(resumed.get("train_seconds", 0.0))
            for name, passes in resumed.get("passes", {}).items():
                if hasattr(splits[name], "passes"):
                    splits[name].passes = int(passes)
            if run_dir is not None:  # drop rows of an epoch whose checkpoint was not written
                write_text_atomic(
                    run_dir / "history.jsonl", "".join(json.dumps(r) + "\n" for r in history)
                )
            set_rng_state(resumed["rng"])  # last: the state right after the saved epoch
            if cfg.train.patience is not None and stale >= cfg.train.patience:
                first_epoch = cfg.train.epochs + 1  # it had stopped early; only the end is left
        tc = cfg.train
        # batch norm cannot train on a shard of one row (torchrun only)
        min_rows = 2 if group.active and _has_batch_norm(model) else 1
        progress = self._progress() if main else None
        task = (
            progress.add_task("training", total=tc.epochs, completed=first_epoch - 1)
            if progress
            else None
        )
        with progress or nullcontext():
            for epoch in range(first_epoch, tc.epochs + 1):
                t0 = time.perf_counter()
                model.train()
                strategy.on_epoch_start(epoch)
                generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
                sums: dict[str, float] = {}
                count = 0
                for batch, shard in group.train_batches(
                    train, tc.batch_size, generator, tc.missing_rate, min_rows
                ):
                    with group.step(shard):
                        logs = strategy.training_step(batch)
                    for k, v in logs.items():
                        # under torchrun: this rank's share of the global batch's value
                        sums[k] = sums.get(k, 0.0) + (v if shard is None else v * shard.weight)
                    count += 1
                sums = group.sum_logs(sums)
                if scheduler is not None:
                    scheduler.step()
                train_time = time.perf_counter() - t0
                group.sync_buffers(model)
                improved = stop = False
                if main:
                    t1 = time.perf_counter()
                    report = self._evaluate(model, strategy, "val", val, prior, device)
                    eval_time = time.perf_counter() - t1
                    row = {
                        "epoch": epoch,
                        "train": {k: v / max(count, 1) for k, v in sums.items()},
                        "val": report.to_dict(),
                        "lr": optimizer.param_groups[0]["lr"],
                        "train_time_s": round(train_time, 4),
                        "eval_time_s": round(eval_time, 4),
                    }
                    key = (report.accuracy, report.loss)
                    improved = key[0] > best_key[0] or (
                        key[0] == best_key[0] and key[1] < best_key[1]
                    )
                    if improved:
                        best_key, best_epoch, stale = key, epoch, 0
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                        best_strategy = strategy.state_dict()
                        if ckpt_dir is not None:
                            save_checkpoint(
                                ckpt_dir / "best.safetensors",
                                model,
                                self._meta(epoch, strategy, info),
                            )
                    else:
                        stale += 1
                    strategy.on_epoch_end(epoch, report)
                    if strategy.restarts_patience():
                        stale = 0  # a new training stage starts (e.g. udi's followers)
                    row.update(strategy.epoch_log())
                    row["best"] = improved
                    history.append(row)
                    if run_dir is not None:
                        # the checkpoint is the truth a resume starts from; history.jsonl
                        # is rewritten from it, so a kill between the two writes is harmless
                        meta = self._meta(epoch, strategy, info)
                        meta["resume"] = {
                            "epoch": epoch,
                            "history": history,
                            "best_key": list(best_key),
                            "best_epoch": best_epoch,
                            "best_strategy": best_strategy,
                            "stale": stale,
                            "scheduler": None if scheduler is None else scheduler.state_dict(),
                            "rng": rng_state(),
                            "passes": {
                                n: sp.passes for n, sp in splits.items() if hasattr(sp, "passes")
                            },
                            "train_seconds": earlier_seconds + time.perf_counter() - started,
                        }
                        save_checkpoint(ckpt_dir / "last.safetensors", model, meta, optimizer)
                        write_text_atomic(
                            run_dir / "history.jsonl",
                            "".join(json.dumps(r) + "\n" for r in history),
                        )
                    if self.on_epoch is not None:
                        self.on_epoch(row)
                    if progress is not None:
                        progress.update(
                            task, advance=1, description=self._describe(epoch, row, best_key[0])
                        )
                    stop = tc.patience is not None and stale >= tc.patience
                if group.active:
                    # rank 0's decisions and strategy state (e.g. the next modality order)
                    improved, stop = self._follow(group, strategy, (improved, stop))
                    if improved and not main:
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if stop:
                    break
        train_seconds = earlier_seconds + time.perf_counter() - started

        if best_state is not None:
            model.load_state_dict(best_state)
            if main:
                strategy.load_state_dict(best_strategy)
        metrics: dict[str, Any] = {}
        if main:
            t2 = time.perf_counter()
            val_report = self._evaluate(model, strategy, "val", val, prior, device)
            test_report = self._evaluate(model, strategy, "test", test, prior, device)
            val_dict, test_dict = val_report.to_dict(), test_report.to_dict()
        else:
            t2 = 0.0
            val_report = test_report = None
            val_dict, test_dict = {}, {}
        if cfg.train.relative_edm and strategy.name != "unimodal" and len(info.modalities) > 1:
            self._add_relative_edm(data, val_report, test_report, val_dict, test_dict, prior, group)
        if main:
            metrics = {
                "run": cfg.run_name(),
                "dataset": info.name,
                "strategy": strategy.name,
                "fusion": cfg.model.fusion,
                "seed": cfg.seed,
                "modalities": list(info.modality_names),
                "best_epoch": best_epoch,
                "epochs_run": len(history) - 1,
                "train_time_s": round(train_seconds, 3),
                "final_eval_time_s": round(time.perf_counter() - t2, 3),
                "inference": _jsonable(strategy.inference_kwargs()),
                "val": val_dict,
                "test": test_dict,
                "versions": library_versions(),
            }
            if group.active:
                metrics["world_size"] = group.world
            if run_dir is not None:
                write_json_atomic(run_dir / "metrics.json", metrics)
        if group.active:
            metrics, history = self._follow(group, strategy, (metrics, history))
        return TrainResult(
            metrics=metrics, run_dir=run_dir, history=history, model=model, strategy=strategy
        )

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
        state, meta, optim_state = read_checkpoint(path)
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
        load_model_state(model, state, str(path))
        optimizer.load_state_dict(optim_state)
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

    @staticmethod
    def _follow(group: Distributed, strategy: Strategy, payload: Any = None) -> Any:
        """Under torchrun: rank 0's ``payload`` and strategy state on every rank."""
        if not group.active:
            return payload
        state, payload = group.broadcast_object((strategy.state_dict(), payload))
        if not group.is_main:
            strategy.load_state_dict(state)
        return payload

    def _add_relative_edm(
        self, data, val_report, test_report, val_dict, test_dict, prior, group=None
    ) -> None:
        """Relative EDM of both splits from the modalities' stand-alone validation accuracy.

        Under torchrun every rank trains the unimodal runs together (the cache is read and
        written by rank 0); rank 0 fills the dictionaries.
        """
        from equimodal.balance.edm import relative_edm
        from equimodal.evaluate import value_of_prior
        from equimodal.standalone import standalone_accuracies

        group = group or Distributed()
        cache_dir = self.run_dir.parent / ".standalone" if self.run_dir is not None else None
        if group.active:
            from equimodal.standalone import cached_standalone

            found = cached_standalone(self.config, data, cache_dir) if group.is_main else None
            ability = group.broadcast_object(found)
            if ability is None:
                ability = standalone_accuracies(
                    self.config, data, cache_dir if group.is_main else None, read_cache=False
                )
            if not group.is_main:
                return
        else:
            ability = standalone_accuracies(self.config, data, cache_dir)
        names = data.modalities
        chance = value_of_prior(prior, data.val.labels, "accuracy")
        for report, out in ((val_report, val_dict), (test_report, test_dict)):
            if report.shapley is None:
                continue
            rel = relative_edm(report.shapley.values, [ability[m] for m in names], chance)
            out["relative_edm"] = rel.edm
            out["capability_share"] = dict(zip(names, map(float, rel.reference), strict=True))
        test_dict["standalone_val_accuracy"] = ability

    # ------------------------------------------------------------------ display
    def _progress(self) -> Progress | None:
        if not self.show_progress:
            return None
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )

    def _describe(self, epoch: int, row: dict[str, Any], best: float) -> str:
        loss = row["train"].get("loss", float("nan"))
        acc = 100 * row["val"]["accuracy"]
        text = f"epoch {epoch} loss {loss:.3f} val {acc:.1f}% (best {100 * best:.1f}%)"
        if "order" in row:
            text += " order " + ">".join(row["order"])
        return text


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


def load_run(
    run_dir: str | Path, which: str = "best"
) -> tuple[RunConfig, MultimodalModel, Strategy, MultimodalData]:
    """Rebuild a saved run: its config, data (same seed and splits), model and strategy."""
    from equimodal.config import build_config, load_yaml

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
    config = build_config(load_yaml(run_dir / "config.yaml"))
    data = load_dataset(config.dataset.name, seed=config.seed, **config.dataset.options)
    model = build_model(config, data.info)
    path = run_dir / "checkpoints" / f"{which}.safetensors"
    state, meta, _ = read_checkpoint(path)
    load_model_state(model, state, str(path))
    strategy = build_strategy(config.strategy)
    strategy.setup(
        TrainContext(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            modalities=data.info.modality_names,
            num_classes=data.info.num_classes,
            seed=config.seed,
        )
    )
    strategy.load_state_dict(meta.get("strategy_state", {}))
    model.eval()
    return config, model, strategy, data


def remove_run_dir(run_dir: Path) -> None:
    """Delete a run folder that was created by this process and holds no finished run."""
    if run_dir.exists() and not (run_dir / "metrics.json").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
