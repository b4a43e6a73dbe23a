"""Fixed, seeded splits and train-only standardisation shared by the loaders."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from equimodal.data.base import DatasetInfo, FeatureSplit, MultimodalData


def stratified_holdout(
    indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (kept, held-out) with a stratified ``fraction`` held out.

    ``labels`` are the labels of the whole dataset (indexed by ``indices``). Uses
    ``sklearn.model_selection.train_test_split(..., stratify=..., random_state=seed)``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"a held-out fraction must be in (0, 1), got {fraction}")
    indices = np.asarray(indices)
    kept, held = train_test_split(
        indices, test_size=fraction, stratify=labels[indices], random_state=seed
    )
    return np.sort(kept), np.sort(held)


def check_finite(name: str, source: str, array: np.ndarray) -> None:
    """Raise a ValueError naming the first row and column holding NaN or Inf."""
    bad = ~np.isfinite(array)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"{source}: modality {name!r} has a non-finite value ({array[row, col]}) "
            f"at row {row}, column {col}"
        )


def build_data(
    info: DatasetInfo,
    features: Mapping[str, np.ndarray],
    labels: np.ndarray,
    rows: Mapping[str, np.ndarray],
    standardize: bool = True,
    options: dict[str, object] | None = None,
) -> MultimodalData:
    """Assemble a :class:`MultimodalData` from full arrays and the row ids of each split.

    With ``standardize``, each feature is z-scored with the mean and standard deviation
    of the **training rows only** (a constant feature gets standard deviation 1).
    """
    train_rows = rows["train"]
    prepared: dict[str, np.ndarray] = {}
    for name, x in features.items():
        x = np.asarray(x, dtype=np.float64)
        if standardize:
            mean = x[train_rows].mean(axis=0)
            std = x[train_rows].std(axis=0)
            std[std == 0] = 1.0
            x = (x - mean) / std
        prepared[name] = x.astype(np.float32)

    def split(ids: np.ndarray) -> FeatureSplit:
        ids = np.asarray(ids, dtype=np.int64)
        return FeatureSplit(
            {m: torch.from_numpy(x[ids]) for m, x in prepared.items()},
            torch.from_numpy(np.asarray(labels)[ids].astype(np.int64)),
            torch.from_numpy(ids),
        )

    return MultimodalData(
        info=info,
        train=split(train_rows),
        val=split(rows["val"]),
        test=split(rows["test"]),
        options=dict(options or {}),
    )
