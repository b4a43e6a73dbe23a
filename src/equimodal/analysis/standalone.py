"""Stand-alone ability of each modality, for relative EDM.

The ability of modality ``m`` is the validation accuracy of a ``unimodal`` model of ``m``
trained with the run's own settings (:func:`unimodal_config`). It depends on everything
those unimodal runs compute with (the dataset and its options, the seed, the model, the
optimizer, every training setting), not on the method under study, so it is computed once
per such key and cached: as JSON in the folder that holds the run folders (under
``.standalone/``), and in process.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from equimodal.config import RunConfig, build_config
from equimodal.core.files import write_json_atomic
from equimodal.data.base import MultimodalData
from equimodal.engine.trainer import Trainer
from equimodal.strategies.unimodal import UnimodalStrategy

#: the in-process cache: ``(key, None)`` for data loaded by name from the config (shared by
#: every run of that key), ``(key, id(data))`` for a data object a caller passed (that
#: object only; the weak reference tells a reused id from the same object)
_MEMORY_CACHE: dict[
    tuple[str, int | None], tuple[weakref.ref[MultimodalData] | None, dict[str, float]]
] = {}


def standalone_key(config: RunConfig, modalities: Sequence[str]) -> str:
    """A hash of the full resolved configs of the unimodal runs of ``modalities``.

    Those configs (:func:`unimodal_config`) hold everything the stand-alone accuracies can
    depend on: the dataset and its options, the seed, the model (encoders and their
    options, width, memory options), the optimizer and its schedule, and every ``train``
    setting (epochs, batch sizes, patience, device, determinism, missing rate, Shapley
    settings). Left out are only the settings that cannot change what the unimodal runs
    compute, because :func:`unimodal_config` replaces them: the run name, the method under
    study (strategy and its options) and its fusion, and ``train.relative_edm``.
    """
    runs = {m: unimodal_config(config, m).model_dump(mode="json") for m in modalities}
    text = json.dumps(runs, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def unimodal_config(config: RunConfig, modality: str) -> RunConfig:
    """The config of the unimodal run of ``modality`` that matches ``config``."""
    tree: dict[str, Any] = config.model_dump(mode="json")
    tree["strategy"] = {"name": UnimodalStrategy.name, "modality": modality}
    tree["model"]["fusion"] = UnimodalStrategy.default_fusion
    tree["name"] = None
    tree["train"]["relative_edm"] = False
    tree["train"]["loggers"] = []  # an in-memory run: nothing to track
    return build_config(tree)


def _memory_slot(key: str, data: MultimodalData, loaded_by_name: bool) -> tuple[str, int | None]:
    return (key, None if loaded_by_name else id(data))


def _memory_get(key: str, data: MultimodalData, loaded_by_name: bool) -> dict[str, float] | None:
    entry = _MEMORY_CACHE.get(_memory_slot(key, data, loaded_by_name))
    if entry is None:
        return None
    ref, accuracy = entry
    if ref is not None and ref() is not data:
        return None  # another object that got the id of a collected one
    return dict(accuracy)


def _memory_put(
    key: str, data: MultimodalData, loaded_by_name: bool, accuracy: dict[str, float]
) -> None:
    slot = _memory_slot(key, data, loaded_by_name)
    ref = None
    if not loaded_by_name:  # forget the entry with the object
        ref = weakref.ref(data, lambda _, slot=slot: _MEMORY_CACHE.pop(slot, None))
    _MEMORY_CACHE[slot] = (ref, dict(accuracy))


def cached_standalone(
    config: RunConfig,
    data: MultimodalData,
    cache_dir: str | Path | None = None,
    loaded_by_name: bool = False,
) -> dict[str, float] | None:
    """The cached stand-alone accuracies of ``config``'s key (memory, then file), or None.

    ``loaded_by_name`` True says ``data`` is what the config's dataset section loads (the
    in-process cache is then shared by every such run); False, for a data object the
    caller built, keeps its in-process entry to that object.
    """
    key = standalone_key(config, data.modalities)
    found = _memory_get(key, data, loaded_by_name)
    if found is not None:
        return found
    path = Path(cache_dir) / f"{key}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if set(stored["accuracy"]) == set(data.modalities):
                accuracy = {m: float(stored["accuracy"][m]) for m in data.modalities}
                _memory_put(key, data, loaded_by_name, accuracy)
                return accuracy
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable cache entry is recomputed
    return None


def standalone_accuracies(
    config: RunConfig,
    data: MultimodalData,
    cache_dir: str | Path | None = None,
    read_cache: bool = True,
    loaded_by_name: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """Validation accuracy of a unimodal model of each modality (cached by key).

    ``read_cache`` False trains even when a cached value exists (multi-process training
    decides on rank 0 whether to read it); the result is still written to ``cache_dir``.
    ``loaded_by_name``: see :func:`cached_standalone`. ``progress``: announce each
    unimodal run on stderr and show its progress bar.
    """
    key = standalone_key(config, data.modalities)
    path = Path(cache_dir) / f"{key}.json" if cache_dir is not None else None
    if read_cache:
        found = cached_standalone(config, data, cache_dir, loaded_by_name)
        if found is not None:
            return found
    accuracy = {}
    console = Console(stderr=True) if progress else None
    for k, m in enumerate(data.modalities, start=1):
        if console is not None:
            console.print(
                f"relative EDM: stand-alone ability of {m}, unimodal run {k} of "
                f"{len(data.modalities)} (cached for later runs of these settings)"
            )
        result = Trainer(unimodal_config(config, m), data=data, progress=progress).fit()
        accuracy[m] = float(result.metrics["val"]["accuracy"])
    _memory_put(key, data, loaded_by_name, accuracy)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            path,
            {"key": key, "dataset": config.dataset.name, "seed": config.seed, "accuracy": accuracy},
        )
    return dict(accuracy)
