"""``features``: your own data, one feature file per modality.

Folder layout (``dataset.options.root``)::

    my_data/
      audio.npy            one file per modality: .npy, .npz (one array) or .parquet,
      video.npz            rows = samples, columns = features (extra axes are flattened)
      labels.txt           one label per line (integers or class names); or labels.npy
      split.txt            optional: train / val / test per line
      mask.npz             optional: a boolean array per modality name, False = absent

A modality is absent for a sample when its mask says so or when its whole row is NaN; a
row that is only partly NaN, or holds Inf, is an error naming the file and the row. A
blank line inside ``labels.txt`` or ``split.txt`` is an error (blank lines at the end are
ignored), so a missing label never shifts the rows after it.
Without a split file, a stratified ``test_fraction`` of the samples is the test split;
without validation rows, a stratified ``val_fraction`` of the training rows is held out
(both seeded). Features are standardised with training-row statistics of the present rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from equimodal.core.validation import show as _show
from equimodal.data.base import DatasetInfo, ModalitySpec, MultimodalData
from equimodal.data.registry import register_dataset
from equimodal.data.splits import build_data, stratified_holdout

FEATURE_SUFFIXES = (".npy", ".npz", ".parquet")
RESERVED = ("labels", "split", "mask")
SPLIT_WORDS = ("train", "val", "test")
#: the model keeps one torch submodule per modality under the modality's name: a name with
#: a "." or one of these attribute names cannot be a submodule's name
TORCH_NAMES = frozenset(dir(torch.nn.ModuleDict()))
#: the largest magnitude of an unstandardised feature: its square still fits float32
RAW_LIMIT = float(np.sqrt(np.finfo(np.float32).max))

INFO = DatasetInfo(
    name="features",
    modalities=(),
    num_classes=0,
    num_samples=0,
    source="your files: one .npy / .npz / .parquet per modality + labels (options.root)",
    license="yours",
    description="user data; see equimodal.data.features for the folder layout",
)


def _cannot_read(path: Path, err: BaseException) -> ValueError:
    """``cannot read 'path': <why>`` in one line (or ``err`` itself when it names the file)."""
    if isinstance(err, ValueError) and str(path) in str(err):
        return err
    detail = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.strerror:  # no "[Errno 21]", no second path
        detail = err.strerror
    if isinstance(err, MemoryError):
        detail = f"too large for memory ({detail})"
    return ValueError(f"cannot read {str(path)!r}: {detail}")


def _load_npy(path: Path) -> np.ndarray:
    """The array of a .npy file; an .npz archive under a .npy name is an error."""
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.ndarray):  # an NpzFile: np.load looks at the bytes
        loaded.close()
        raise ValueError(f"{str(path)!r} is an .npz archive, not a .npy array; rename it")
    return loaded


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive; a plain .npy array under an .npz name is an error."""
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):
        raise ValueError(f"{str(path)!r} is a .npy array, not an .npz archive; rename it")
    with loaded as bundle:
        return {key: np.asarray(bundle[key]) for key in bundle.files}


def read_array(path: Path) -> np.ndarray:
    """One numeric array from a .npy, a single-array .npz or a .parquet file, as float64
    ``(rows, features)``; any failure is a ValueError naming the file."""
    try:
        if path.suffix == ".npy":
            array = _load_npy(path)
        elif path.suffix == ".npz":
            bundle = _load_npz(path)
            if len(bundle) != 1:
                raise ValueError(
                    f"{str(path)!r}: a modality .npz must hold one array, it holds "
                    f"{len(bundle)} ({', '.join(bundle) or 'none'})"
                )
            (array,) = bundle.values()
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
    except Exception as err:  # a user's file: corrupt zip, cut header, pickle, too large...
        raise _cannot_read(path, err) from None
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{str(path)!r}: features must be numeric, got dtype {array.dtype}")
    if array.ndim == 0:
        raise ValueError(f"{str(path)!r}: expected one row per sample, got a scalar")
    columns = int(np.prod(array.shape[1:], dtype=np.int64))
    if columns == 0:
        raise ValueError(f"{str(path)!r} has no feature columns (shape {array.shape})")
    with np.errstate(over="ignore"):  # float128 beyond float64: inf, reported by presence()
        return array.reshape(array.shape[0], columns).astype(np.float64)


def read_lines(path: Path) -> list[str]:
    """The stripped first CSV column of each line of a text file.

    Blank lines at the end are dropped; a blank line inside stays as ``""`` for the caller
    to report (dropping it would shift every row after it).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{str(path)!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
            f"{err.start})"
        ) from None
    lines = [
        line.split(",")[0].strip()
        for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    ]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _blank(path: Path, values: list[str], what: str) -> None:
    """A ValueError naming the first blank entry of ``values`` (and its line), if any."""
    blank = [i for i, v in enumerate(values) if not v]
    if blank:
        line = f" (line {blank[0] + 1})" if path.suffix != ".npy" else ""
        more = f" ({len(blank)} blank rows)" if len(blank) > 1 else ""
        raise ValueError(f"{str(path)!r}: row {blank[0]}{line} is blank{more}; {what}")


def _class_ids(values: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class ids and names: integers in numeric order if every value is one, else names."""
    try:
        ints = [int(v) for v in values]
    except ValueError:
        names = sorted(set(values))
        index = {name: k for k, name in enumerate(names)}
        return np.array([index[v] for v in values], dtype=np.int64), tuple(names)
    unique = sorted(set(ints))
    position = {value: k for k, value in enumerate(unique)}
    ids = np.array([position[v] for v in ints], dtype=np.int64)
    return ids, tuple(str(v) for v in unique)


def read_labels(root: Path) -> tuple[np.ndarray, tuple[str, ...], Path]:
    """Class ids, class names and the labels file."""
    candidates = [root / f"labels{s}" for s in (".npy", ".txt", ".csv")]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{str(root)!r} has no labels file (labels.npy, .txt or .csv)")
    if path.suffix == ".npy":
        try:
            raw = _load_npy(path).reshape(-1)
        except Exception as err:
            raise _cannot_read(path, err) from None
        values = _label_texts(path, raw)
    else:
        values = read_lines(path)
    if not values:
        raise ValueError(f"{str(path)!r} holds no labels")
    _blank(path, values, "every sample needs a label")
    labels, names = _class_ids(values)
    if len(names) < 2:
        raise ValueError(f"{str(path)!r}: needs at least 2 classes, found {len(names)}")
    return labels, names, path


def _label_texts(path: Path, raw: np.ndarray) -> list[str]:
    """The labels of a labels.npy as text: integers (whole floats too) or class names."""
    kind = raw.dtype.kind
    if kind in "biu":
        return [str(int(v)) for v in raw.tolist()]
    if kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(raw) | (np.mod(raw, 1) != 0)
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(
                f"{str(path)!r}: row {row} is {raw[row]}; a label is an integer or a class name"
            )
        return [str(int(v)) for v in raw.tolist()]
    if kind in "US":
        return [
            (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)).strip()
            for v in raw.tolist()
        ]
    raise ValueError(
        f"{str(path)!r}: labels must be integers or class names, got dtype {raw.dtype}"
    )


def discover_modalities(root: Path, names: list[str] | None) -> dict[str, Path]:
    """Modality name -> feature file (every feature file but labels/split/mask)."""
    found: dict[str, Path] = {}
    for p in sorted(root.iterdir()):
        if p.suffix not in FEATURE_SUFFIXES or p.stem in RESERVED:
            continue
        if p.stem in found:
            raise ValueError(
                f"{str(root)!r} has two files for modality {p.stem!r} "
                f"({found[p.stem].name} and {p.name}); keep one"
            )
        found[p.stem] = p
    if names is None:
        if len(found) < 1:
            raise FileNotFoundError(
                f"{str(root)!r} has no modality files ({', '.join(FEATURE_SUFFIXES)})"
            )
        chosen = found
    else:
        missing = [m for m in names if m not in found]
        if missing:
            raise FileNotFoundError(
                f"{str(root)!r}: no file for modality {missing[0]!r} "
                f"(looked for {missing[0]}{{{','.join(FEATURE_SUFFIXES)}}})"
            )
        chosen = {m: found[m] for m in names}
    for name, path in chosen.items():
        if "." in name or name in TORCH_NAMES:
            why = "holds a '.'" if "." in name else "is reserved by torch"
            other = name.replace(".", "_") if "." in name else f"{name}_features"
            raise ValueError(
                f"{str(path)!r}: the modality name {name!r} {why}; rename the file "
                f"(e.g. to {other}{path.suffix})"
            )
    return chosen


def read_masks(path: Path, files: dict[str, Path], n: int, labels_path: Path) -> dict:
    """``mask.npz``: one boolean (or 0/1) array of ``n`` rows per modality, False = absent."""
    try:
        arrays = _load_npz(path)
    except Exception as err:
        raise _cannot_read(path, err) from None
    masks: dict[str, np.ndarray] = {}
    for key, array in arrays.items():
        if key not in files:
            raise ValueError(f"{str(path)!r}: key {key!r} is not a modality ({', '.join(files)})")
        flat = array.reshape(-1)
        if flat.dtype.kind not in "biuf":
            raise ValueError(
                f"{str(path)!r}: {key!r} must be boolean (False = absent), got dtype {flat.dtype}"
            )
        if flat.dtype.kind != "b":
            odd = (flat != 0) & (flat != 1)  # NaN is odd too
            if odd.any():
                row = int(np.argmax(odd))
                raise ValueError(
                    f"{str(path)!r}: {key!r} must be boolean (False = absent), "
                    f"row {row} is {flat[row]}"
                )
        if flat.shape[0] != n:
            raise ValueError(
                f"{str(path)!r}: {key!r} has {flat.shape[0]} rows, "
                f"{str(labels_path)!r} has {n} labels"
            )
        masks[key] = flat.astype(bool)
    return masks


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
    folder = _root(root)
    names = _modality_names(modalities)
    for option, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(
                f"dataset.options.{option} must be a number between 0 and 1 (exclusive), "
                f"got {_show(value)}"
            )
    if not isinstance(standardize, bool):
        raise ValueError(
            f"dataset.options.standardize must be true or false, got {_show(standardize)}"
        )
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            f"dataset folder {str(folder)!r} is a file; dataset.options.root must be a folder"
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {str(folder)!r} does not exist")
    labels, classes, labels_path = read_labels(folder)
    n = labels.shape[0]
    files = discover_modalities(folder, names)
    mask_path = folder / "mask.npz"
    masks = read_masks(mask_path, files, n, labels_path) if mask_path.is_file() else {}
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
        if not standardize:
            _fits_float32(path, x)
        features[name] = np.where(present[name][:, None], np.nan_to_num(x), 0.0)
    nobody = ~np.stack(list(present.values()), 1).any(1)
    if nobody.any():
        raise ValueError(
            f"{str(folder)!r}: sample {int(np.argmax(nobody))} has no modality at all "
            f"({int(nobody.sum())} such samples)"
        )
    rows = _split_rows(folder, labels, classes, seed, val_fraction, test_fraction)
    if standardize:
        for name, path in files.items():
            if not present[name][rows["train"]].any():
                raise ValueError(
                    f"{str(path)!r}: modality {name!r} is absent from every training row, so "
                    "it cannot be standardised; give training rows data or set "
                    "dataset.options.standardize=false"
                )
    info = DatasetInfo(
        name="features",
        modalities=tuple(ModalitySpec(m, (x.shape[1],), "features") for m, x in features.items()),
        num_classes=len(classes),
        num_samples=n,
        source=str(folder),
        license="yours",
        class_names=classes,
    )
    sources = {name: str(path) for name, path in files.items()}
    options: dict[str, object] = {"root": str(folder)}
    return build_data(info, features, labels, rows, standardize, options, present, sources)


def _root(root: object) -> Path:
    """``dataset.options.root`` as a Path; an empty or non-path value is an error."""
    if not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"dataset.options.root must be a folder path, got {_show(root)}")
    if not str(root).strip():
        raise ValueError("dataset.options.root is empty; give the folder of your feature files")
    return Path(root)


def _modality_names(modalities: object) -> list[str] | None:
    """``dataset.options.modalities``: None (all files), one name, or a list of names."""
    if modalities is None:
        return None
    if isinstance(modalities, str):
        modalities = [modalities]
    if not isinstance(modalities, (list, tuple)) or not all(
        isinstance(m, str) and m for m in modalities
    ):
        raise ValueError(
            f"dataset.options.modalities must be a list of modality names, got {_show(modalities)}"
        )
    if not modalities:
        raise ValueError("dataset.options.modalities is empty; name at least one modality")
    twice = [m for k, m in enumerate(modalities) if m in modalities[:k]]
    if twice:
        raise ValueError(f"dataset.options.modalities names {twice[0]!r} twice")
    return list(modalities)


def _fits_float32(path: Path, x: np.ndarray) -> None:
    """Unstandardised features are trained on as float32, where a magnitude beyond
    ``RAW_LIMIT`` overflows at its square (Adam's second moment, variances): refused."""
    big = np.abs(np.nan_to_num(x)) > RAW_LIMIT
    if big.any():
        row, col = np.argwhere(big)[0]
        raise ValueError(
            f"{str(path)!r}: row {row}, column {col} is {x[row, col]:g}; unstandardised "
            f"features must stay within ±{RAW_LIMIT:.1e} (the square of a larger value "
            "overflows float32): rescale the column or set dataset.options.standardize=true"
        )


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
