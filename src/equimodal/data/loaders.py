"""What several dataset loaders share: option checks, the validation hold-out, readers.

The loaders of the prepared (media and text) datasets read a folder written by
``equimodal prepare`` (:mod:`equimodal.data.prepare`) and serve it as
:class:`~equimodal.data.items.ItemSplit` s; the audio-visual ones (``cremad``,
``kinetics_sounds``) build all their splits with :func:`build_av_data`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equimodal.data.base import ModalitySpec, MultimodalData
from equimodal.data.frames import list_frames, load_frames, sample_frame_indices
from equimodal.data.items import ItemSplit
from equimodal.data.prepare import prepare_hint
from equimodal.data.splits import stratified_holdout


# --------------------------------------------------------------------------- options
def prepared_root(root: str | None, dataset: str) -> Path:
    """``dataset.options.root`` as a path; a one-line error with the prepare hint if unset."""
    if root is None:
        raise ValueError(
            f"dataset {dataset!r} needs dataset.options.root, the folder of a prepared copy; "
            + prepare_hint(dataset, "ROOT")
        )
    return Path(root).expanduser()


def check_workers(num_workers: int | str) -> None:
    """ValueError unless ``num_workers`` is ``"auto"`` or an integer >= 0."""
    if num_workers == "auto":
        return
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be 'auto' or an integer >= 0, got {num_workers!r}")


def check_loader_options(
    num_workers: int | str, max_items: int | None, max_text_bytes: int
) -> None:
    """One-line errors for the loader options shared by the text datasets."""
    check_workers(num_workers)
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items must be >= 1 or null, got {max_items}")
    if max_text_bytes < 1:
        raise ValueError(f"max_text_bytes must be >= 1, got {max_text_bytes}")


def missing_files_error(dataset: str, root: Path, missing: list[str]) -> FileNotFoundError:
    """The one error for a prepared folder with missing files: the first one and the count."""
    return FileNotFoundError(
        f"{len(missing)} files of dataset {dataset!r} are missing under {str(root)!r}; "
        f"first: {missing[0]}; {prepare_hint(dataset, root)} (finished items are skipped)"
    )


def hold_out_validation(
    dataset: str,
    train_rows: np.ndarray,
    y: np.ndarray,
    val_fraction: float,
    seed: int,
    quick: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` rows: a stratified ``val_fraction`` of ``train_rows`` for ``seed``.

    With ``quick`` (a few items, e.g. ``max_items``) a class too small to stratify falls
    back to a seeded random hold-out instead of an error.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    try:
        return stratified_holdout(train_rows, y, val_fraction, seed)
    except ValueError as err:
        if not quick:
            raise ValueError(
                f"dataset {dataset!r}: cannot hold out a stratified validation split ({err})"
            ) from None
    order = np.random.default_rng(seed).permutation(train_rows)
    n_val = max(1, int(round(val_fraction * len(order))))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


# --------------------------------------------------------------------------- item readers
def item_rng(seed: int, split: Any, item: dict[str, Any]) -> np.random.Generator:
    """The generator of one training item: seeded by (seed, pass over ``split``, row)."""
    passes = int(getattr(split, "passes", 0))
    return np.random.default_rng([seed, passes, int(item["row"])])


class AVReader:
    """Reads one item ``{"row", "audio", "frames"}`` of a prepared audio-visual dataset.

    The spectrogram comes from the ``.npy`` cache (cropped to ``audio_frames`` time
    frames), the frames from jpg files: ``num_frames`` of them by
    :func:`sample_frame_indices`, resized to ``frame_size``. Training draws the frames
    and the augmentation from a generator seeded by (seed, pass over the split, row),
    so runs reproduce whatever the number of loader workers, and the global RNG (dropout
    masks) is not touched.
    """

    def __init__(
        self,
        num_frames: int,
        frame_size: int,
        audio_frames: int,
        train: bool = False,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self.num_frames = num_frames
        self.frame_size = frame_size
        self.audio_frames = audio_frames
        self.train = train
        self.augment = augment
        self.seed = seed
        self.split: Any = None  # the ItemSplit, for its pass counter

    def __call__(self, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        rng = item_rng(self.seed, self.split, item) if self.train else None
        try:
            spec = np.load(item["audio"], allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            reason = err or type(err).__name__
            raise ValueError(f"cannot read spectrogram {item['audio']!r}: {reason}") from None
        if spec.ndim == 2:
            spec = spec[None]
        spec = np.ascontiguousarray(spec[..., : self.audio_frames], dtype=np.float32)
        frames = item["frames"]
        picks = sample_frame_indices(len(frames), self.num_frames, self.train, rng)
        visual = load_frames(
            [frames[i] for i in picks],
            self.frame_size,
            augment=self.train and self.augment,
            rng=rng,
        )
        return {"audio": torch.from_numpy(spec), "visual": visual}


class AVItemSplit(ItemSplit):
    """An ItemSplit whose :class:`AVReader` follows it to a device copy (pass counter)."""

    def to(self, device: torch.device | str) -> ItemSplit:
        """The same split, its batches delivered on ``device``."""
        out = super().to(device)
        reader = copy.copy(self.read)
        reader.split = out
        out.read = reader
        return out


def reader_split(
    items: Sequence[Any],
    ids: np.ndarray,
    reader: Any,
    labels: np.ndarray,
    shapes: dict[str, tuple[int, ...]],
    num_workers: int | str,
    dtypes: dict[str, torch.dtype] | None = None,
) -> AVItemSplit:
    """The rows ``ids`` of ``items`` as a split read by ``reader`` (given the split back)."""
    split = AVItemSplit(
        [items[i] for i in ids],
        reader,
        torch.from_numpy(labels[ids]),
        shapes,
        indices=torch.from_numpy(np.asarray(ids, dtype=np.int64)),
        num_workers=num_workers,
        **({"dtypes": dtypes} if dtypes else {}),
    )
    reader.split = split
    return split


# --------------------------------------------------------------------------- audio-visual
def build_av_data(
    info: Any,
    root: Path,
    names: dict[str, list[str]],
    labels: dict[str, list[int]],
    audio_shape: tuple[int, ...],
    frame_rate: float,
    *,
    seed: int,
    num_frames: int,
    frame_size: int,
    audio_seconds: float | None,
    val_fraction: float,
    num_workers: int | str,
    max_items: int | None,
    augment: bool,
    options: dict[str, Any] | None = None,
) -> Any:
    """Train / val / test :class:`~equimodal.data.items.ItemSplit` s of a prepared folder.

    ``names`` / ``labels`` hold the ``train`` and ``test`` rows of the split files;
    validation is a stratified ``val_fraction`` of train for ``seed``. Every file is
    checked here, in the main process: a missing one is a single FileNotFoundError naming
    the first missing file and the count.
    """
    dataset = info.name
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if frame_size < 8:
        raise ValueError(f"frame_size must be >= 8, got {frame_size}")
    check_workers(num_workers)
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items must be >= 1 or null, got {max_items}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    total_frames = int(audio_shape[-1])
    audio_frames = total_frames
    if audio_seconds is not None:
        if audio_seconds <= 0:
            raise ValueError(f"audio_seconds must be positive, got {audio_seconds}")
        audio_frames = 1 + int(audio_seconds * frame_rate)
        if audio_frames > total_frames:
            raise ValueError(
                f"audio_seconds={audio_seconds} needs {audio_frames} spectrogram frames but "
                f"{str(root)!r} was prepared with {total_frames}; prepare it for longer audio"
            )
    rows: dict[str, list[tuple[str, int]]] = {}
    for split in ("train", "test"):
        pairs = list(zip(names[split], labels[split], strict=True))
        rows[split] = pairs[:max_items] if max_items is not None else pairs
    items: list[dict[str, Any]] = []
    all_labels: list[int] = []
    missing: list[str] = []
    for split in ("train", "test"):
        for name, label in rows[split]:
            audio = root / "audio" / f"{name}.npy"
            frames = list_frames(root / "visual" / name)
            if not audio.is_file():
                missing.append(str(audio))
            if not frames:
                missing.append(str(root / "visual" / name / "*.jpg"))
            items.append(
                {"row": len(items), "audio": str(audio), "frames": [str(f) for f in frames]}
            )
            all_labels.append(label)
    if missing:
        raise missing_files_error(dataset, root, missing)
    y = np.asarray(all_labels, dtype=np.int64)
    n_train = len(rows["train"])
    train_rows, test_rows = np.arange(n_train), np.arange(n_train, len(items))
    if n_train < 2 or len(test_rows) == 0:
        raise ValueError(
            f"dataset {dataset!r} at {str(root)!r} has {n_train} train and {len(test_rows)} "
            "test items; need at least 2 and 1"
        )
    # a few items for a quick run (max_items): some class may have a single training item
    train_rows, val_rows = hold_out_validation(
        dataset, train_rows, y, val_fraction, seed, quick=max_items is not None
    )
    audio_shape = (*tuple(audio_shape[:-1]), audio_frames)
    visual_shape = (num_frames, 3, frame_size, frame_size)
    shapes = {"audio": audio_shape, "visual": visual_shape}

    def make(ids: np.ndarray, train: bool) -> ItemSplit:
        reader = AVReader(num_frames, frame_size, audio_frames, train, augment, seed)
        return reader_split(items, ids, reader, y, shapes, num_workers)

    new_info = replace(
        info,
        modalities=(
            ModalitySpec("audio", audio_shape, "spectrogram"),
            ModalitySpec("visual", visual_shape, "frames"),
        ),
        num_samples=len(items),
    )
    return MultimodalData(
        info=new_info,
        train=make(train_rows, True),
        val=make(val_rows, False),
        test=make(test_rows, False),
        options=dict(options)
        if options is not None
        else {
            "root": str(root),
            "num_frames": num_frames,
            "frame_size": frame_size,
            "audio_seconds": audio_seconds,
            "val_fraction": val_fraction,
            "max_items": max_items,
            "augment": augment,
        },
    )
