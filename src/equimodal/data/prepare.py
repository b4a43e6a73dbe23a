"""The prepare step (``equimodal prepare DATASET --raw DIR --out DIR``) and what preparers share.

A media dataset registers a *preparer* ``prepare(raw, out, progress, **options)`` that
converts its raw files, item by item, into the folder its loader reads. Preparers are safe
to re-run: finished items are skipped and every output is written under a temporary name
and renamed when complete (:func:`atomic_output`). Shared here: the settings file
(``prepare.json``), small atomic writes, and the (threaded) loop over the items.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from equimodal.core.files import atomic_output
from equimodal.core.registries import PREPARERS
from equimodal.core.registry import closest_name

Preparer = Callable[..., "PrepareSummary"]

# The prepared layout of the audio-visual datasets (written by their preparers):
#   ROOT/prepare.json            dataset name and the settings the files were made with
#   ROOT/<split files>           the community split files (items that failed left out)
#   ROOT/audio/<name>.npy        float32 spectrogram (1, F, T)
#   ROOT/visual/<name>/*.jpg     frames, read in natural sorted order
PREPARE_FILE = "prepare.json"


@dataclass
class PrepareSummary:
    """What a prepare run did: items written, items skipped (already done), notes."""

    dataset: str
    written: int = 0
    skipped: int = 0
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- registry
def register_preparer(name: str) -> Callable[[Preparer], Preparer]:
    """Decorator registering ``prepare(raw: Path, out: Path, progress: bool, **options)``."""

    def decorate(fn: Preparer) -> Preparer:
        PREPARERS.add(name, fn)
        return fn

    return decorate


def preparer_names() -> list[str]:
    """Datasets that have a prepare step."""
    return PREPARERS.names()


def prepare_dataset(
    name: str, raw: str | Path, out: str | Path, progress: bool = True, **options: Any
) -> PrepareSummary:
    """Run dataset ``name``'s preparer from ``raw`` into ``out``."""
    names = PREPARERS.names()
    if name not in names:
        if not names:
            raise KeyError(f"no dataset has a prepare step (asked for {name!r})")
        raise KeyError(f"dataset {name!r} has no prepare step; {closest_name(name, names)}")
    preparer = PREPARERS.get(name)
    raw = Path(raw)
    if not raw.is_dir():
        raise FileNotFoundError(f"raw folder {str(raw)!r} does not exist")
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return preparer(raw, out, progress=progress, **options)
    except BaseException:
        # a run that failed before preparing any item leaves no folder behind (its own
        # settings file is no progress); finished items of an earlier or partial run stay
        # for the next attempt
        if created and not _holds_items(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _holds_items(out: Path) -> bool:
    """Whether ``out`` holds a prepared file besides the settings file."""
    return any(p.is_file() and p != out / PREPARE_FILE for p in out.rglob("*"))


# --------------------------------------------------------------------------- atomic outputs
def write_text_file(path: Path, lines: Sequence[str]) -> None:
    """Write ``lines`` (newline-terminated) to ``path`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def save_npy(path: Path, array: np.ndarray) -> None:
    """Save ``array`` as ``path`` (.npy) atomically."""
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array, dtype=np.float32))


def npy_shape(path: Path) -> tuple[int, ...] | None:
    """The shape stored in a ``.npy`` header (None when unreadable)."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            shape, _, _ = (
                np.lib.format.read_array_header_1_0(fh)
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0(fh)
            )
        return tuple(int(s) for s in shape)
    except (OSError, ValueError):
        return None


def remove_partials(out: Path) -> int:
    """Delete what a killed prepare run left half-written (``.<name>.partial``); the count."""
    count = 0
    for folder in (out, out / "audio", out / "visual"):
        if folder.is_dir():
            for leftover in folder.glob(".*.partial"):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
                count += 1
    return count


# --------------------------------------------------------------------------- settings file
def prepare_hint(dataset: str, root: str | Path) -> str:
    """The command that writes a prepared folder."""
    return f"run `equimodal prepare {dataset} --raw RAW_FOLDER --out {root}`"


def read_prepare_json(root: str | Path, dataset: str) -> dict[str, Any]:
    """The settings of a prepared folder; a one-line error when it is not one."""
    path = Path(root) / PREPARE_FILE
    if Path(root).exists() and not Path(root).is_dir():
        raise NotADirectoryError(
            f"dataset root {str(root)!r} is a file; dataset.options.root must be the folder "
            f"of a prepared copy ({prepare_hint(dataset, 'ROOT')})"
        )
    if not Path(root).is_dir():
        raise FileNotFoundError(
            f"dataset root {str(root)!r} does not exist; {prepare_hint(dataset, root)}"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist, so {str(root)!r} is not a prepared {dataset} "
            f"folder; {prepare_hint(dataset, root)}"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {str(path)!r}: {err}") from None
    if not isinstance(meta, dict) or meta.get("dataset") != dataset:
        found = meta.get("dataset") if isinstance(meta, dict) else None
        raise ValueError(f"{str(path)!r} describes dataset {found!r}, not {dataset!r}")
    return meta


def write_prepare_json(out: Path, dataset: str, settings: dict[str, Any], overwrite: bool) -> None:
    """Record ``settings``; refuse a folder prepared with other settings unless ``overwrite``."""
    path = out / PREPARE_FILE
    if path.is_file() and not overwrite:
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("dataset") not in (None, dataset):
            raise ValueError(
                f"{str(out)!r} holds a prepared {old.get('dataset')!r} dataset; "
                "choose another --out folder"
            )
        for key, value in settings.items():
            before = old.get("settings", {}).get(key)
            if key in old.get("settings", {}) and before != value:
                raise ValueError(
                    f"{str(out)!r} was prepared with {key}={before!r}, now {key}={value!r}; "
                    "use a new --out folder or add -o overwrite=true"
                )
    with atomic_output(path) as tmp:
        text = json.dumps({"dataset": dataset, "settings": settings}, indent=2)
        tmp.write_text(text + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- options, inputs
def check_options(model: type, options: dict[str, Any], what: str):
    """Validate preparer options with a pydantic ``model``; a one-line error otherwise."""
    from pydantic import ValidationError

    from equimodal.core.validation import format_validation_error

    try:
        return model.model_validate(options)
    except ValidationError as err:
        raise ValueError(f"{what}: {format_validation_error(err, model)}") from None


def folder_list(raw: Path, value: str | Sequence[str] | None) -> list[Path]:
    """Folders under ``raw`` from an option: a name, comma-separated names, or a list."""
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else list(value)
    return [raw / str(p).strip() for p in parts if str(p).strip()]


def find_source(name: str, folders: Sequence[Path], suffixes: Sequence[str]) -> Path | None:
    """The first ``folder/name<suffix>`` that exists, trying folders then suffixes."""
    for folder in folders:
        for suffix in suffixes:
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


# --------------------------------------------------------------------------- the item loop
def run_items(
    dataset: str,
    names: Sequence[str],
    work: Any,
    progress: bool,
    workers: int = 1,
    strict: bool = False,
) -> tuple[int, int, dict[str, str]]:
    """Run ``work(name) -> bool`` (True: wrote something) over ``names`` with a progress bar.

    Returns ``(written, skipped, failures)``; ``failures`` maps a name to the one-line
    reason its media could not be converted (``strict`` raises the first one instead).
    Missing programs or packages (ffmpeg, soundfile, pillow) always raise.
    """
    from concurrent.futures import ThreadPoolExecutor

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    written = skipped = 0
    failures: dict[str, str] = {}

    def one(name: str) -> tuple[str, bool | None, str]:
        try:
            return name, bool(work(name)), ""
        except (ValueError, FileNotFoundError) as err:
            if strict or "ffmpeg is needed" in str(err):
                raise
            return name, None, str(err)

    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task(f"prepare {dataset}", total=len(names))
        if workers <= 1:
            results = map(one, names)
            pool = None
        else:
            pool = ThreadPoolExecutor(max_workers=workers)
            results = pool.map(one, names)
        try:
            for name, wrote, reason in results:
                if wrote is None:
                    failures[name] = reason
                elif wrote:
                    written += 1
                else:
                    skipped += 1
                bar.advance(task)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    return written, skipped, failures


def failure_notes(out: Path, failures: dict[str, str], total: int) -> list[str]:
    """Notes for a prepare summary; the failed names are listed in ``out/left_out.txt``."""
    path = out / "left_out.txt"
    if not failures:
        if path.exists():
            path.unlink()
        return []
    write_text_file(path, [f"{name}\t{reason}" for name, reason in failures.items()])
    first, reason = next(iter(failures.items()))
    return [
        f"{len(failures)} of {total} items could not be prepared and are left out of the "
        f"split files (listed in {path}); first: {first}: {reason}"
    ]
