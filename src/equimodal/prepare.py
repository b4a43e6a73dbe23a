"""``equimodal prepare DATASET --raw DIR --out DIR``: raw media to what the loaders read.

Each media dataset registers a *preparer* ``prepare(raw, out, progress, **options)`` that
converts its raw files (wav audio, video) into the prepared layout its loader reads
(spectrogram ``.npy`` files, jpg frames), item by item. Preparers must be safe to re-run:
an item whose outputs exist is skipped, and every output is written to a temporary name
and renamed when complete, so a killed run leaves no half-written file behind.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Preparer = Callable[..., "PrepareSummary"]

_PREPARERS: dict[str, Preparer] = {}
_BUILTIN_MODULES = (
    "equimodal.data.cremad",
    "equimodal.data.kinetics_sounds",
    "equimodal.data.mvsa",
    "equimodal.data.iemocap",
)


@dataclass
class PrepareSummary:
    """What a prepare run did: items written, items skipped (already done), notes."""

    dataset: str
    written: int = 0
    skipped: int = 0
    notes: list[str] = field(default_factory=list)


def register_preparer(name: str) -> Callable[[Preparer], Preparer]:
    """Decorator registering ``prepare(raw: Path, out: Path, progress: bool, **options)``."""

    def decorate(fn: Preparer) -> Preparer:
        _PREPARERS[name] = fn
        return fn

    return decorate


def _load_builtin() -> None:
    from equimodal.data.registry import dataset_names

    dataset_names()  # registers the datasets, whose modules register their preparers
    for module in _BUILTIN_MODULES:
        if module not in sys.modules and importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def preparer_names() -> list[str]:
    """Datasets that have a prepare step."""
    _load_builtin()
    return sorted(_PREPARERS)


def prepare_dataset(
    name: str, raw: str | Path, out: str | Path, progress: bool = True, **options: Any
) -> PrepareSummary:
    """Run dataset ``name``'s preparer from ``raw`` into ``out``."""
    from equimodal.data.registry import closest_name

    _load_builtin()
    if name not in _PREPARERS:
        if not _PREPARERS:
            raise KeyError(f"no dataset has a prepare step (asked for {name!r})")
        raise KeyError(
            f"dataset {name!r} has no prepare step; {closest_name(name, list(_PREPARERS))}"
        )
    raw = Path(raw)
    if not raw.is_dir():
        raise FileNotFoundError(f"raw folder {str(raw)!r} does not exist")
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _PREPARERS[name](raw, out, progress=progress, **options)
    except BaseException:
        # a run that failed before preparing any item leaves no folder behind (its own
        # settings file is no progress); finished items of an earlier or partial run stay
        # for the next attempt
        if created and not _holds_items(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _holds_items(out: Path) -> bool:
    """Whether ``out`` holds a prepared file besides the settings file."""
    from equimodal.data.media import PREPARE_FILE

    return any(p.is_file() and p != out / PREPARE_FILE for p in out.rglob("*"))


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only on success.

    A file or folder at the temporary path is removed first (a partial output of a killed
    run), and removed again if the body raises.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    _remove(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        _remove(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


FFMPEG_HINT = (
    "install it with `apt-get install ffmpeg` (Debian/Ubuntu), `brew install ffmpeg` "
    "(macOS), or `pip install imageio-ffmpeg`"
)


def find_ffmpeg() -> str:
    """Path of an ffmpeg program: the system's, else the one imageio-ffmpeg ships."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg  # type: ignore[import-not-found]

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        pass
    raise FileNotFoundError(
        f"ffmpeg is needed to extract video frames but was not found; {FFMPEG_HINT}"
    )
