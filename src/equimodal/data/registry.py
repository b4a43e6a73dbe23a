"""Datasets by name: ``register_dataset`` adds a loader, ``load_dataset`` calls it.

The names live in the :data:`~equimodal.core.registries.DATASETS` registry, which imports
the built-in dataset modules on first use and loads plugins from the
``equimodal.datasets`` entry-point group.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from equimodal.core.registries import DATASETS
from equimodal.core.registry import closest_name
from equimodal.data.base import DatasetInfo, MultimodalData

Loader = Callable[..., MultimodalData]


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: its static description and its loader function."""

    info: DatasetInfo
    loader: Loader

    @property
    def name(self) -> str:
        """The dataset's name."""
        return self.info.name

    def option_names(self) -> tuple[str, ...]:
        """Keyword options the loader accepts (besides ``seed``)."""
        params = inspect.signature(self.loader).parameters
        return tuple(p for p in params if p != "seed")


def register_dataset(info: DatasetInfo) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(*, seed, **options) -> MultimodalData`` as ``info.name``."""

    def decorate(loader: Loader) -> Loader:
        DATASETS.add(info.name, DatasetEntry(info=info, loader=loader))
        return loader

    return decorate


def dataset_names() -> list[str]:
    """Names of all registered datasets, sorted."""
    return DATASETS.names()


def get_entry(name: str) -> DatasetEntry:
    """The registry entry of ``name``; a KeyError naming the closest valid name otherwise."""
    return DATASETS.get(name)


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


__all__ = [
    "DatasetEntry",
    "closest_name",
    "dataset_names",
    "get_entry",
    "load_dataset",
    "register_dataset",
]
