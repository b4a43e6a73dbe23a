"""Dataset registry: name -> loader, listable with ``equimodal datasets``."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from equimodal.data.base import DatasetInfo, MultimodalData

Loader = Callable[..., MultimodalData]


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: its static description and its loader function."""

    info: DatasetInfo
    loader: Loader

    def option_names(self) -> tuple[str, ...]:
        """Keyword options the loader accepts (besides ``seed``)."""
        params = inspect.signature(self.loader).parameters
        return tuple(p for p in params if p != "seed")


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(info: DatasetInfo) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(*, seed, **options) -> MultimodalData`` as ``info.name``."""

    def decorate(loader: Loader) -> Loader:
        if info.name in _REGISTRY:
            raise ValueError(f"dataset {info.name!r} is registered twice")
        _REGISTRY[info.name] = DatasetEntry(info=info, loader=loader)
        return loader

    return decorate


# media datasets: registered when their module exists (they are optional parts of the tree)
_MEDIA_MODULES = (
    "equimodal.data.cremad",
    "equimodal.data.kinetics_sounds",
    "equimodal.data.mvsa",
    "equimodal.data.iemocap",
)


def _ensure_builtin_loaded() -> None:
    # Importing the modules registers the built-in datasets.
    import importlib
    import importlib.util
    import sys

    from equimodal.data import features, htad, mfeat, synthetic  # noqa: F401

    for module in _MEDIA_MODULES:
        if module not in sys.modules and importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def closest_name(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A hint naming the closest valid choice, or listing them all."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    if close:
        return f"did you mean {close[0]!r}?"
    return "choose one of: " + ", ".join(sorted(choices))


def dataset_names() -> list[str]:
    """Names of all registered datasets, sorted."""
    _ensure_builtin_loaded()
    return sorted(_REGISTRY)


def get_entry(name: str) -> DatasetEntry:
    """The registry entry of ``name``; a KeyError naming the closest valid name otherwise."""
    _ensure_builtin_loaded()
    if name not in _REGISTRY:
        raise KeyError(f"unknown dataset {name!r}; {closest_name(name, list(_REGISTRY))}")
    return _REGISTRY[name]


def load_dataset(name: str, seed: int = 0, **options: object) -> MultimodalData:
    """Load dataset ``name`` with its splits for ``seed``; options go to its loader."""
    entry = get_entry(name)
    allowed = entry.option_names()
    for key in options:
        if key not in allowed:
            raise TypeError(
                f"dataset {name!r} has no option {key!r}; {closest_name(key, allowed)}"
                if allowed
                else f"dataset {name!r} takes no options (got {key!r})"
            )
    return entry.loader(seed=seed, **options)
