"""Stand-alone ability of each modality, for relative EDM.

The ability of modality ``m`` is the validation accuracy of a ``unimodal`` model of ``m``
trained with the run's own encoder, optimizer and budget. It depends on the dataset, its
options, the seed (split) and those settings, not on the method under study, so it is
computed once per such key and cached as JSON (in the folder that holds the run folders,
under ``.standalone/``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from equimodal.config import RunConfig, build_config
from equimodal.core.files import write_json_atomic
from equimodal.data.base import MultimodalData
from equimodal.engine.trainer import Trainer
from equimodal.strategies.unimodal import UnimodalStrategy

_MEMORY_CACHE: dict[str, dict[str, float]] = {}


def standalone_key(config: RunConfig) -> str:
    """A hash of everything a stand-alone accuracy depends on."""
    payload = {
        "dataset": config.dataset.model_dump(mode="json"),
        "seed": config.seed,
        "encoder": config.model.encoder.model_dump(mode="json"),
        "encoders": {k: v.model_dump(mode="json") for k, v in config.model.encoders.items()},
        "dim": config.model.dim,
        "optim": config.optim.model_dump(mode="json"),
        "train": config.train.model_dump(mode="json", include={"epochs", "batch_size", "patience"}),
    }
    text = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def unimodal_config(config: RunConfig, modality: str) -> RunConfig:
    """The config of the unimodal run of ``modality`` that matches ``config``."""
    tree: dict[str, Any] = config.model_dump(mode="json")
    tree["strategy"] = {"name": UnimodalStrategy.name, "modality": modality}
    tree["model"]["fusion"] = UnimodalStrategy.default_fusion
    tree["name"] = None
    tree["train"]["relative_edm"] = False
    return build_config(tree)


def cached_standalone(
    config: RunConfig, data: MultimodalData, cache_dir: str | Path | None = None
) -> dict[str, float] | None:
    """The cached stand-alone accuracies of ``config``'s key (memory, then file), or None."""
    key = standalone_key(config)
    if key in _MEMORY_CACHE:
        return dict(_MEMORY_CACHE[key])
    path = Path(cache_dir) / f"{key}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if set(stored["accuracy"]) == set(data.modalities):
                _MEMORY_CACHE[key] = stored["accuracy"]
                return dict(stored["accuracy"])
        except (OSError, ValueError, KeyError):
            pass  # an unreadable cache entry is recomputed
    return None


def standalone_accuracies(
    config: RunConfig,
    data: MultimodalData,
    cache_dir: str | Path | None = None,
    read_cache: bool = True,
) -> dict[str, float]:
    """Validation accuracy of a unimodal model of each modality (cached by key).

    ``read_cache`` False trains even when a cached value exists (multi-process training
    decides on rank 0 whether to read it); the result is still written to ``cache_dir``.
    """
    key = standalone_key(config)
    path = Path(cache_dir) / f"{key}.json" if cache_dir is not None else None
    if read_cache:
        found = cached_standalone(config, data, cache_dir)
        if found is not None:
            return found
    accuracy = {}
    for m in data.modalities:
        result = Trainer(unimodal_config(config, m), data=data, progress=False).fit()
        accuracy[m] = float(result.metrics["val"]["accuracy"])
    _MEMORY_CACHE[key] = accuracy
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            path,
            {"key": key, "dataset": config.dataset.name, "seed": config.seed, "accuracy": accuracy},
        )
    return dict(accuracy)
