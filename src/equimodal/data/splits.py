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


def _zscore(x: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` with the statistics of ``fit_rows`` (a constant column: std 1).

    Where a column's sums overflow (values near the float64 limit, 1e308), that column is
    first divided by its largest magnitude: the z-scores are the same, and finite.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        mean = x[fit_rows].mean(axis=0)
        std = x[fit_rows].std(axis=0)
    wide = ~np.isfinite(mean) | ~np.isfinite(std)
    if wide.any():
        x = x.copy()
        x[:, wide] /= np.abs(x[fit_rows][:, wide]).max(axis=0)
        mean[wide] = x[fit_rows][:, wide].mean(axis=0)
        std[wide] = x[fit_rows][:, wide].std(axis=0)
    std[std == 0] = 1.0
    with np.errstate(over="ignore"):  # an outlier far beyond the training rows: inf,
        return (x - mean) / std  # which build_data reports


def build_data(
    info: DatasetInfo,
    features: Mapping[str, np.ndarray],
    labels: np.ndarray,
    rows: Mapping[str, np.ndarray],
    standardize: bool = True,
    options: dict[str, object] | None = None,
    present: Mapping[str, np.ndarray] | None = None,
    sources: Mapping[str, str] | None = None,
) -> MultimodalData:
    """Assemble a :class:`MultimodalData` from full arrays and the row ids of each split.

    With ``standardize``, each feature is z-scored with the mean and standard deviation
    of the **training rows only** (a constant feature gets standard deviation 1); with
    ``present`` masks, only present training rows count and absent rows are zeros.
    A feature that is not a finite float32 (beyond 3.4e38, before or after standardising)
    is a ValueError naming the row, column and ``sources[modality]`` (the file).
    """
    train_rows = rows["train"]
    n = int(np.asarray(labels).shape[0])
    masks = {m: np.ones(n, dtype=bool) if present is None else present[m] for m in features}
    prepared: dict[str, np.ndarray] = {}
    for name, raw in features.items():
        raw = np.asarray(raw, dtype=np.float64)
        x = raw
        if standardize:
            fit_rows = train_rows[masks[name][train_rows]]
            if len(fit_rows) == 0:
                raise ValueError(f"modality {name!r} is absent from every training sample")
            x = np.where(masks[name][:, None], _zscore(raw, fit_rows), 0.0)
        with np.errstate(over="ignore"):  # reported just below
            prepared[name] = x.astype(np.float32)
        bad = ~np.isfinite(prepared[name])
        if bad.any():
            row, col = np.argwhere(bad)[0]
            where = repr(sources[name]) if sources and name in sources else f"modality {name!r}"
            how = (
                f"{raw[row, col]:g}, which standardises to {x[row, col]:g}"
                if standardize
                else f"{raw[row, col]:g}"
            )
            raise ValueError(
                f"{where}: row {row}, column {col} is {how}, not a finite float32 feature "
                "(|x| <= 3.4e38); rescale the column"
            )

    def split(ids: np.ndarray) -> FeatureSplit:
        ids = np.asarray(ids, dtype=np.int64)
        return FeatureSplit(
            {m: torch.from_numpy(x[ids]) for m, x in prepared.items()},
            torch.from_numpy(np.asarray(labels)[ids].astype(np.int64)),
            torch.from_numpy(ids),
            {m: torch.from_numpy(masks[m][ids]) for m in prepared},
        )

    return MultimodalData(
        info=info,
        train=split(train_rows),
        val=split(rows["val"]),
        test=split(rows["test"]),
        options=dict(options or {}),
    )
