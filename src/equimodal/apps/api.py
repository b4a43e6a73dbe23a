"""Training from Python with your own data and modules: :func:`fit`.

``equimodal.fit`` is the short way to train any method of the library on your data::

    result = equimodal.fit(
        train=train_dataset, val=val_dataset, test=test_dataset,
        encoders={"audio": MyCNN(), "video": MyGRU()},
        epochs=20, run_dir="runs/mine",  # strategy: shapley_alternating by default
    )
    result.metrics["test"]["accuracy"], result.metrics["test"]["edm"]

It builds the splits (:func:`equimodal.data.custom.make_data`), the config (defaults,
then ``config``, then ``overrides``, then the keyword settings) and a
:class:`~equimodal.engine.trainer.Trainer`, trains, and with a ``run_dir`` draws the same
plots as ``equimodal train``. The trained model and strategy come back in the result, for
:func:`equimodal.evaluate`, :func:`equimodal.evaluate_robustness` and
:func:`equimodal.diagnose`; :func:`equimodal.load_run` rebuilds a saved run (pass the same
``data`` and ``encoders``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from equimodal.config import RunConfig, build_config
from equimodal.data.base import MultimodalData
from equimodal.data.custom import make_data
from equimodal.engine.callbacks import Callback
from equimodal.engine.runs import remove_run_dir, write_error_log
from equimodal.engine.trainer import Trainer, TrainResult

#: keyword settings of :func:`fit` and the config key each one sets
SETTINGS = {
    "strategy": "strategy.name",
    "seed": "seed",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "optim.lr",
    "fusion": "model.fusion",
    "dim": "model.dim",
    "device": "train.device",
    "name": "name",
}


def fit(
    train: Any,
    val: Any,
    test: Any = None,
    *,
    encoders: Mapping[str, nn.Module] | None = None,
    config: RunConfig | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    num_classes: int | None = None,
    progress: bool = True,
    plots: bool = True,
    callbacks: Sequence[Callback] = (),
    **settings: Any,
) -> TrainResult:
    """Train a multimodal classifier on your own data; returns the
    :class:`~equimodal.engine.trainer.TrainResult` (metrics, history, model, strategy).

    ``train``, ``val`` and ``test`` are each ``(inputs, labels[, present])`` with inputs
    a dict of modality tensors, a map-style torch Dataset or a DataLoader (see
    :mod:`equimodal.data.custom`), or all three come from one :class:`MultimodalData`
    passed as ``train`` with ``val`` None. Without ``test`` no test split is scored.
    ``encoders`` maps modalities to your own ``nn.Module`` encoders (an ``out_dim``
    attribute, or the width is measured); the others get the config's encoder.
    ``settings`` are shortcuts for common config keys: ``strategy``, ``seed``, ``epochs``,
    ``batch_size``, ``lr``, ``fusion``, ``dim``, ``device``, ``name``. ``run_dir`` saves
    the run there (config, history, metrics, checkpoints, plots); the folder must not
    hold a run already. Relative EDM (which trains one unimodal model per modality) is
    off unless the config turns ``train.relative_edm`` on (not possible with modules of
    yours: the unimodal runs are built from the config).
    """
    unknown = [k for k in settings if k not in SETTINGS]
    if unknown:
        raise TypeError(
            f"fit() got an unknown setting {unknown[0]!r}; settings are "
            f"{', '.join(SETTINGS)} (other config keys: overrides=['section.key=value'])"
        )
    if isinstance(train, MultimodalData):
        if val is not None or test is not None:
            raise ValueError("give either a MultimodalData as train, or train, val and test")
        data = train
    else:
        data = make_data(train, val, test, num_classes=num_classes)
    tree: dict[str, Any] = (
        config.model_dump(mode="json")
        if isinstance(config, RunConfig)
        else copy.deepcopy(dict(config or {}))
    )
    train_section = tree.setdefault("train", {})
    train_section.setdefault("relative_edm", False)
    if test is None and not isinstance(train, MultimodalData):
        train_section["score_test"] = False
    if not isinstance(train, MultimodalData):
        tree.setdefault("dataset", {})["name"] = data.info.name
    settings_overrides = [f"{SETTINGS[k]}={_yaml_value(v)}" for k, v in settings.items()]
    cfg = build_config(tree, [*overrides, *settings_overrides])
    if encoders and cfg.train.relative_edm:
        raise ValueError(
            "train.relative_edm trains unimodal models from the config, which cannot "
            "rebuild your own encoder modules; turn it off"
        )
    created = False
    if run_dir is not None:
        run_dir = Path(run_dir)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FileExistsError(
                f"run folder {str(run_dir)!r} is not empty; nothing already there is "
                "overwritten (choose another folder)"
            )
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(
        cfg,
        data=data,
        run_dir=run_dir,
        progress=progress,
        callbacks=callbacks,
        encoders=encoders,
    )
    try:
        if cfg.train.relative_edm and not encoders:
            from equimodal.analysis.relative_edm import fit_run

            result = fit_run(trainer)
        else:
            result = trainer.fit()
    except BaseException as exc:
        if run_dir is not None:
            if trainer.training_started:  # keep what was trained, say why it stopped
                write_error_log(run_dir, exc)
            else:
                remove_run_dir(run_dir)
                if not created:  # the empty folder the user gave stays, empty
                    run_dir.mkdir(parents=True, exist_ok=True)
        raise
    if run_dir is not None and plots:
        from equimodal.apps.report import plot_run

        try:
            plot_run(run_dir)
        except Exception as exc:  # a plot must never cost the user a finished run
            warnings.warn(f"could not draw the plots of {run_dir}: {exc}", stacklevel=2)
    return result


def _yaml_value(value: Any) -> str:
    """A setting's value as the YAML text of a ``key=value`` override."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
