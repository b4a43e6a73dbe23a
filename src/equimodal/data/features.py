"""``features``: your own data, one feature file per modality.

Folder layout (``dataset.options.root``)::

    my_data/
      audio.npy            one file per modality: .npy, .npz (one array) or .parquet,
      video.npz            rows = samples, columns = features (extra axes are flattened)
      labels.txt           one label per line (integers or class names); or labels.npy
      split.txt            optional: train / val / test per line
      mask.npz             optional: a boolean array per modality name, False = absent

A modality is absent for a sample when its mask says so or when its whole row is NaN; a
row that is only partly NaN, or holds Inf, is an error naming the file and the row.
Without a split file, a stratified ``test_fraction`` of the samples is the test split;
without validation rows, a stratified ``val_fraction`` of the training rows is held out
(both seeded). Features are standardised with training-row statistics of the present rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from equimodal.data.base import DatasetInfo, ModalitySpec, MultimodalData
from equimodal.data.registry import register_dataset
from equimodal.data.splits import build_data, stratified_holdout

FEATURE_SUFFIXES = (".npy", ".npz", ".parquet")
RESERVED = ("labels", "split", "mask")
SPLIT_WORDS = ("train", "val", "test")

INFO = DatasetInfo(
    name="features",
    modalities=(),
    num_classes=0,
    num_samples=0,
    source="your files: one .npy / .npz / .parquet per modality + labels (options.root)",
    license="yours",
    description="user data; see equimodal.data.features for the folder layout",
)


def read_array(path: Path) -> np.ndarray:
    """One numeric array from a .npy, a single-array .npz or a .parquet file."""
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as bundle:
                keys = list(bundle.keys())
                if len(keys) != 1:
                    raise ValueError(
                        f"{str(path)!r}: a modality .npz must hold one array, it holds "
                        f"{len(keys)} ({', '.join(keys) or 'none'})"
                    )
                array = bundle[keys[0]]
        elif path.suffix == ".parquet":
            try:
                import pandas as pd

                array = pd.read_parquet(path).to_numpy()
            except ImportError as err:
                raise ValueError(
                    f"{str(path)!r}: reading parquet needs pyarrow (pip install pyarrow)"
                ) from err
        else:
            raise ValueError(f"{str(path)!r}: unsupported file type {path.suffix!r}")
    except (OSError, ValueError, EOFError) as err:  # EOFError: an empty or cut .npy
        if str(path) in str(err):
            raise
        raise ValueError(f"cannot read {str(path)!r}: {err or type(err).__name__}") from None
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{str(path)!r}: features must be numeric, got dtype {array.dtype}")
    if array.ndim == 0:
        raise ValueError(f"{str(path)!r}: expected one row per sample, got a scalar")
    return array.reshape(array.shape[0], -1).astype(np.float64)


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a text file (first CSV column)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.split(",")[0].strip() for line in lines if line.strip()]


def read_labels(root: Path) -> tuple[np.ndarray, tuple[str, ...], Path]:
    """Class ids, class names and the labels file."""
    candidates = [root / f"labels{s}" for s in (".npy", ".txt", ".csv")]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{str(root)!r} has no labels file (labels.npy, .txt or .csv)")
    if path.suffix == ".npy":
        try:
            raw = np.load(path, allow_pickle=False).reshape(-1)
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"cannot read {str(path)!r}: {err or type(err).__name__}") from None
    else:
        raw = np.asarray(read_lines(path))
    if raw.size == 0:
        raise ValueError(f"{str(path)!r} holds no labels")
    try:
        ints = raw.astype(np.int64)
        if raw.dtype.kind == "f" and not np.array_equal(ints, raw):
            raise ValueError
        names = tuple(str(c) for c in np.unique(ints))
        labels = np.searchsorted(np.unique(ints), ints)
    except ValueError:
        classes = np.unique(raw.astype(str))
        names = tuple(str(c) for c in classes)
        labels = np.searchsorted(classes, raw.astype(str))
    if len(names) < 2:
        raise ValueError(f"{str(path)!r}: needs at least 2 classes, found {len(names)}")
    return labels.astype(np.int64), names, path


def discover_modalities(root: Path, names: list[str] | None) -> dict[str, Path]:
    """Modality name -> feature file (every feature file but labels/split/mask)."""
    found = {
        p.stem: p
        for p in sorted(root.iterdir())
        if p.suffix in FEATURE_SUFFIXES and p.stem not in RESERVED
    }
    if names is None:
        if len(found) < 1:
            raise FileNotFoundError(
                f"{str(root)!r} has no modality files ({', '.join(FEATURE_SUFFIXES)})"
            )
        return found
    missing = [m for m in names if m not in found]
    if missing:
        raise FileNotFoundError(
            f"{str(root)!r}: no file for modality {missing[0]!r} "
            f"(looked for {missing[0]}{{{','.join(FEATURE_SUFFIXES)}}})"
        )
    return {m: found[m] for m in names}


def presence(name: str, path: Path, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Rows where the modality is present; errors on partial NaN rows or Inf values."""
    nan = np.isnan(x)
    all_nan = nan.all(axis=1)
    partial = nan.any(axis=1) & ~all_nan
    if partial.any():
        row = int(np.argmax(partial))
        raise ValueError(
            f"{str(path)!r}: row {row} is partly NaN (a wholly NaN row marks an absent "
            f"sample; a partly NaN one is an error)"
        )
    inf = np.isinf(x)
    if inf.any():
        row, col = np.argwhere(inf)[0]
        raise ValueError(f"{str(path)!r}: row {row}, column {col} is infinite")
    present = ~all_nan
    if mask is not None:
        present &= mask
    return present


@register_dataset(INFO)
def load_features(
    *,
    seed: int = 0,
    root: str | None = None,
    modalities: list[str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    standardize: bool = True,
) -> MultimodalData:
    """Load a folder of per-modality feature files; see the module doc for the layout."""
    if root is None:
        raise ValueError(
            "dataset 'features' needs dataset.options.root: a folder with one feature file "
            "per modality and a labels file"
        )
    folder = Path(root)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            f"dataset folder {str(folder)!r} is a file; dataset.options.root must be a folder"
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {str(folder)!r} does not exist")
    labels, classes, labels_path = read_labels(folder)
    n = labels.shape[0]
    files = discover_modalities(folder, modalities)
    masks: dict[str, np.ndarray] = {}
    mask_path = folder / "mask.npz"
    if mask_path.is_file():
        with np.load(mask_path, allow_pickle=False) as bundle:
            for key in bundle.files:
                if key not in files:
                    raise ValueError(
                        f"{str(mask_path)!r}: key {key!r} is not a modality ({', '.join(files)})"
                    )
                masks[key] = np.asarray(bundle[key]).astype(bool).reshape(-1)
                if masks[key].shape[0] != n:
                    raise ValueError(
                        f"{str(mask_path)!r}: {key!r} has {masks[key].shape[0]} rows, "
                        f"{str(labels_path)!r} has {n} labels"
                    )
    features: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    for name, path in files.items():
        x = read_array(path)
        if x.shape[0] != n:
            raise ValueError(
                f"{str(path)!r} has {x.shape[0]} rows but {str(labels_path)!r} has {n} labels"
            )
        present[name] = presence(name, path, x, masks.get(name))
        if not present[name].any():
            why = "every row is NaN" if np.isnan(x).all() else f"{mask_path.name} marks it absent"
            raise ValueError(
                f"{str(path)!r}: modality {name!r} is absent for every sample ({why}); "
                "remove the file or give it data"
            )
        features[name] = np.where(present[name][:, None], np.nan_to_num(x), 0.0)
    nobody = ~np.stack(list(present.values()), 1).any(1)
    if nobody.any():
        raise ValueError(
            f"{str(folder)!r}: sample {int(np.argmax(nobody))} has no modality at all "
            f"({int(nobody.sum())} such samples)"
        )
    rows = _split_rows(folder, labels, classes, seed, val_fraction, test_fraction)
    info = DatasetInfo(
        name="features",
        modalities=tuple(ModalitySpec(m, (x.shape[1],), "features") for m, x in features.items()),
        num_classes=len(classes),
        num_samples=n,
        source=str(folder),
        license="yours",
        class_names=classes,
    )
    return build_data(info, features, labels, rows, standardize, {"root": str(folder)}, present)


def _holdout(
    rows: np.ndarray,
    labels: np.ndarray,
    classes: tuple[str, ...],
    fraction: float,
    seed: int,
    what: str,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`stratified_holdout` whose failure names the class that is too small."""
    counts = np.bincount(labels[rows], minlength=len(classes))
    present = counts[counts > 0]
    if present.size and present.min() < 2:
        small = classes[int(np.flatnonzero(counts == present.min())[0])]
        raise ValueError(
            f"cannot hold out a stratified {what}: class {small!r} has only "
            f"{int(present.min())} row to draw from; give it more rows or a split file"
        )
    try:
        return stratified_holdout(rows, labels, fraction, seed)
    except ValueError as err:
        raise ValueError(f"cannot hold out a stratified {what}: {err}") from None


def _split_rows(
    folder: Path,
    labels: np.ndarray,
    classes: tuple[str, ...],
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> dict[str, np.ndarray]:
    n = labels.shape[0]
    split_path = next(
        (folder / f"split{s}" for s in (".txt", ".csv") if (folder / f"split{s}").is_file()),
        None,
    )
    everything = np.arange(n)
    if split_path is None:
        where = f"test split of {str(folder)!r} (test_fraction {test_fraction})"
        train, test = _holdout(everything, labels, classes, test_fraction, seed, where)
        val = np.array([], dtype=np.int64)
    else:
        words = read_lines(split_path)
        if len(words) != n:
            raise ValueError(f"{str(split_path)!r} has {len(words)} rows, expected {n}")
        bad = [i for i, w in enumerate(words) if w not in SPLIT_WORDS]
        if bad:
            raise ValueError(
                f"{str(split_path)!r}: row {bad[0]} is {words[bad[0]]!r}; "
                f"use one of {', '.join(SPLIT_WORDS)}"
            )
        arr = np.asarray(words)
        train, val, test = (everything[arr == w] for w in SPLIT_WORDS)
        empty = [w for w, rows in (("train", train), ("test", test)) if len(rows) == 0]
        if empty:
            raise ValueError(
                f"{str(split_path)!r}: the {empty[0]} split is empty (no row says "
                f"{empty[0]!r}); it needs train and test rows"
            )
    counts = np.bincount(labels[train], minlength=len(classes))
    if (counts == 0).any():
        absent = classes[int(np.argmax(counts == 0))]
        source = str(split_path) if split_path is not None else str(folder)
        more = int((counts == 0).sum()) - 1
        also = f" (and {more} more {'class' if more == 1 else 'classes'})" if more else ""
        raise ValueError(
            f"{source!r}: class {absent!r} has no training sample{also}; "
            "every class needs training rows"
        )
    if len(val) == 0:
        where = (
            f"validation split from the training rows of {str(folder)!r} "
            f"(val_fraction {val_fraction})"
        )
        train, val = _holdout(train, labels, classes, val_fraction, seed, where)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
