"""Run folders: rebuild a saved run (config, data, model, strategy), remove a failed one."""

from __future__ import annotations

import contextlib
import shutil
import traceback
from collections.abc import Mapping
from pathlib import Path

import torch

from equimodal.config import ConfigError, RunConfig, build_config, load_yaml
from equimodal.core.files import write_text_atomic
from equimodal.core.registries import DATASETS
from equimodal.data.base import MultimodalData
from equimodal.data.registry import load_dataset
from equimodal.engine.build import build_model
from equimodal.engine.checkpoint import load_model_state, read_checkpoint
from equimodal.engine.strategy import Strategy, TrainContext, build_strategy
from equimodal.models.model import MultimodalModel


def load_run(
    run_dir: str | Path,
    which: str = "best",
    *,
    data: MultimodalData | None = None,
    encoders: Mapping[str, torch.nn.Module] | None = None,
) -> tuple[RunConfig, MultimodalModel, Strategy, MultimodalData]:
    """Rebuild a saved run: its config, data (same seed and splits), model and strategy.

    A run trained on data from Python (:func:`equimodal.data.custom.make_data`) needs
    that ``data`` again, and one trained with your own encoder modules needs the same
    ``encoders`` (their weights are loaded from the checkpoint). Modules the config
    lists under ``imports`` are imported first.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
    raw = load_yaml(run_dir / "config.yaml")
    try:
        config = build_config(raw)
    except ConfigError as err:
        if "unknown" not in str(err):
            raise
        raise ConfigError(
            f"{run_dir / 'config.yaml'}: {err}; the run was trained with a part registered "
            "from Python: import or register it before loading the run"
        ) from None
    if data is None:
        if config.dataset.name not in DATASETS:
            raise ValueError(
                f"run {str(run_dir)!r} was trained on data passed from Python (dataset "
                f"{config.dataset.name!r}); pass it again: load_run(RUN, data=...)"
            )
        data = load_dataset(config.dataset.name, seed=config.seed, **config.dataset.options)
    model = build_model(config, data.info, encoders)
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


def write_error_log(run_dir: Path, exc: BaseException) -> None:
    """The error and its traceback in ``RUN/error.log`` (best effort: the disk may be full)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    with contextlib.suppress(OSError):
        write_text_atomic(Path(run_dir) / "error.log", text)
