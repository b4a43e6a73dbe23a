"""HTAD: home-task activities from a wrist accelerometer and audio (1386 samples, 7 classes).

Source: E. Garcia-Ceja, V. Thambawita, S. A. Hicks, D. Jha, P. H. Jakobsen, H. L. Hammer,
P. Halvorsen, M. A. Riegler, "HTAD: A Home-Tasks Activities Dataset with
Wrist-accelerometer and Audio Features", MMM 2021. Data terms (the package's readme): free
for research and education; cite the paper. The file is ``data/htad.csv`` of the PyPI
package multiviewstacking 0.7.5 (latin-1; column ``class``; 36 audio columns ``v1_*``,
16 accelerometer columns ``v2_*``), installed as a dependency of equimodal.

Classes are numbered in sorted name order. Test rows for a seed are those of
``train_test_split(arange(N), test_size=0.2, stratify=y, random_state=seed)`` — the test
sets of the reference baselines — and validation is a stratified ``val_fraction`` (1/8)
of the remaining rows.
"""

from __future__ import annotations

import csv
import io
from functools import lru_cache
from importlib import resources

import numpy as np

from equimodal.data.base import DatasetInfo, ModalitySpec, MultimodalData
from equimodal.data.registry import register_dataset
from equimodal.data.splits import build_data, check_finite, stratified_holdout

CLASSES = (
    "brush_teeth",
    "eat_chips",
    "mop_floor",
    "sweep",
    "type_on_keyboard",
    "wash_hands",
    "watch_tv",
)
INFO = DatasetInfo(
    name="htad",
    modalities=(ModalitySpec("audio", (36,), "features"), ModalitySpec("accel", (16,), "features")),
    num_classes=7,
    num_samples=1386,
    source=(
        "HTAD (Garcia-Ceja et al., MMM 2021); data/htad.csv of the PyPI package "
        "multiviewstacking 0.7.5"
    ),
    license="free for research and education; cite the paper",
    description="wrist-accelerometer and audio features of 7 home tasks",
    class_names=CLASSES,
)
CSV_NAME = "multiviewstacking/data/htad.csv"


@lru_cache(maxsize=1)
def read_htad() -> tuple[dict[str, np.ndarray], np.ndarray, tuple[str, ...]]:
    """``({"audio": (N,36), "accel": (N,16)}, labels, class names)`` from the packaged CSV."""
    try:
        path = resources.files("multiviewstacking") / "data" / "htad.csv"
        text = path.read_bytes().decode("latin-1")
    except (ModuleNotFoundError, FileNotFoundError):
        raise FileNotFoundError(
            f"HTAD reads {CSV_NAME} from the package multiviewstacking; "
            "install it with: pip install multiviewstacking==0.7.5"
        ) from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    rows = [r for r in reader if r]
    if "class" not in header:
        raise ValueError(f"{CSV_NAME}: no 'class' column")
    cls = header.index("class")
    audio_cols = [i for i, h in enumerate(header) if h.startswith("v1_")]
    accel_cols = [i for i, h in enumerate(header) if h.startswith("v2_")]
    if len(audio_cols) != 36 or len(accel_cols) != 16:
        raise ValueError(
            f"{CSV_NAME}: expected 36 audio (v1_*) and 16 accelerometer (v2_*) columns, "
            f"found {len(audio_cols)} and {len(accel_cols)}"
        )
    names = np.array([r[cls] for r in rows])
    classes, labels = np.unique(names, return_inverse=True)
    features = {}
    for modality, cols in (("audio", audio_cols), ("accel", accel_cols)):
        try:
            x = np.array([[float(r[c]) for c in cols] for r in rows], dtype=np.float64)
        except ValueError as err:
            raise ValueError(f"{CSV_NAME}: a {modality} value is not a number ({err})") from None
        check_finite(modality, CSV_NAME, x)
        features[modality] = x
    return features, labels.astype(np.int64), tuple(str(c) for c in classes)


@register_dataset(INFO)
def load_htad(
    *, seed: int = 0, val_fraction: float = 0.125, standardize: bool = True
) -> MultimodalData:
    """Load HTAD with the reference baselines' test rows for ``seed``."""
    features, labels, classes = read_htad()
    everything = np.arange(labels.shape[0])
    train_all, test = stratified_holdout(everything, labels, 0.2, seed)
    train, val = stratified_holdout(train_all, labels, val_fraction, seed)
    return build_data(
        INFO,
        features,
        labels,
        {"train": train, "val": val, "test": test},
        standardize=standardize,
        options={"val_fraction": val_fraction},
    )
