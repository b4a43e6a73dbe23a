"""Relative EDM of a finished run: its Shapley shares against its modalities' stand-alone
abilities (unimodal runs with the run's settings, cached; see
:mod:`equimodal.analysis.standalone`).

It trains other models, so it runs after :meth:`Trainer.fit`, never inside the loop.
:func:`fit_run` is ``fit`` followed by this step when ``train.relative_edm`` asks for it;
the command line and the bench train through it.
"""

from __future__ import annotations

from typing import Any

from equimodal.analysis.standalone import cached_standalone, standalone_accuracies
from equimodal.balance.edm import relative_edm
from equimodal.core.files import write_json_atomic
from equimodal.data.base import MultimodalData
from equimodal.data.registry import load_dataset
from equimodal.engine.build import select_device
from equimodal.engine.distributed import Distributed
from equimodal.engine.trainer import Trainer, TrainResult
from equimodal.engine.validation import class_prior, value_of_prior


def fit_run(trainer: Trainer) -> TrainResult:
    """``trainer.fit()``, then relative EDM added to the metrics (and ``metrics.json``)
    when the config asks for it and the method trains a multimodal model.

    Under torchrun every rank calls this; the process group stays up across the fit and
    the unimodal runs, which every rank trains together.
    """
    cfg = trainer.config
    # data the caller passed is theirs: its in-process stand-alone cache is its own; data
    # loaded here by name shares that cache with every run of the same settings
    loaded_by_name = trainer.data is None
    if loaded_by_name:  # load once: fit and the unimodal runs share it
        trainer.data = load_dataset(cfg.dataset.name, seed=cfg.seed, **cfg.dataset.options)
    group, _ = Distributed.setup(select_device(cfg.train.device))
    try:
        result = trainer.fit()
        strategy = result.strategy
        wanted = (
            cfg.train.relative_edm
            and strategy is not None
            and strategy.measures_relative_edm
            and len(trainer.data.modalities) > 1
        )
        if wanted:
            add_relative_edm(trainer, result, group, loaded_by_name=loaded_by_name)
    finally:
        group.close()
    return result


def add_relative_edm(
    trainer: Trainer,
    result: TrainResult,
    group: Distributed | None = None,
    loaded_by_name: bool = False,
) -> None:
    """Add ``relative_edm`` and ``capability_share`` to both splits of ``result.metrics``
    and ``standalone_val_accuracy`` to its test split; rewrite ``metrics.json``.

    ``loaded_by_name`` True says ``trainer.data`` was loaded from the config's dataset
    section (by :func:`fit_run`), not passed by the caller: only then is the in-process
    cache of stand-alone accuracies shared with other runs of the same settings (see
    :func:`~equimodal.analysis.standalone.cached_standalone`).

    Under torchrun every rank trains the unimodal runs together (the cache is read and
    written by rank 0); rank 0's metrics reach every rank.
    """
    group = group or Distributed()
    data: MultimodalData = trainer.data  # type: ignore[assignment]
    cfg = trainer.config
    run_dir = result.run_dir if group.is_main else None
    cache_dir = trainer.run_dir.parent / ".standalone" if trainer.run_dir is not None else None
    if group.active:
        found = cached_standalone(cfg, data, cache_dir, loaded_by_name) if group.is_main else None
        ability = group.broadcast_object(found)
        if ability is None:
            ability = standalone_accuracies(
                cfg,
                data,
                cache_dir if group.is_main else None,
                read_cache=False,
                loaded_by_name=loaded_by_name,
            )
    else:
        ability = standalone_accuracies(
            cfg, data, cache_dir, loaded_by_name=loaded_by_name, progress=trainer.show_progress
        )
    metrics = result.metrics
    if group.is_main:
        _fill(metrics, data, ability)
        if run_dir is not None:
            write_json_atomic(run_dir / "metrics.json", metrics)
    if group.active:
        result.metrics = group.broadcast_object(metrics)


def _fill(metrics: dict[str, Any], data: MultimodalData, ability: dict[str, float]) -> None:
    names = data.modalities
    prior = class_prior(data.train.labels, data.num_classes)
    chance = value_of_prior(prior, data.val.labels, "accuracy")
    for split in ("val", "test"):
        out = metrics[split]
        if "shapley" not in out:
            continue
        phi = [out["shapley"][m] for m in names]
        rel = relative_edm(phi, [ability[m] for m in names], chance)
        out["relative_edm"] = rel.edm
        out["capability_share"] = dict(zip(names, map(float, rel.reference), strict=True))
    metrics["test"]["standalone_val_accuracy"] = ability
