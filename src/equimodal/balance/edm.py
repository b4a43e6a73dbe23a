"""Equilibrium Deviation Metric (EDM) and relative EDM (METHODS §1.6, our formula).

The paper (arXiv 2506.00030) introduces EDM without a public formula. Ours: from Shapley
values ``phi_m`` of accuracy, the contribution shares ``p_m = max(phi_m, 0) / sum_k
max(phi_k, 0)`` (all ``1/M`` when the sum is 0), the signed deviations ``d_m = p_m - 1/M``
(negative: a minor modality) and ``EDM = M / (2 (M - 1)) * sum_m |d_m|`` in [0, 1]:
0 when every modality contributes equally, 1 when one modality carries everything.
(EDM is the total-variation distance to equal shares scaled by ``M / (M - 1)``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EDMResult:
    """EDM in [0, 1], the shares, the signed deviations and the reference shares used."""

    edm: float
    shares: np.ndarray
    deviations: np.ndarray
    reference: np.ndarray

    @property
    def percent(self) -> float:
        """EDM in percent."""
        return 100.0 * self.edm


def contribution_shares(phi: Sequence[float] | np.ndarray) -> np.ndarray:
    """``max(phi, 0)`` normalised to sum 1 (uniform when no value is positive)."""
    phi = np.asarray(phi, dtype=float)
    if phi.ndim != 1 or phi.size < 2:
        raise ValueError(f"EDM needs the values of at least 2 modalities, got shape {phi.shape}")
    if not np.all(np.isfinite(phi)):
        raise ValueError("Shapley values must be finite")
    pos = np.clip(phi, 0.0, None)
    total = pos.sum()
    return pos / total if total > 0 else np.full(phi.size, 1.0 / phi.size)


def edm(phi: Sequence[float] | np.ndarray) -> EDMResult:
    """EDM of Shapley values ``phi`` (one per modality)."""
    shares = contribution_shares(phi)
    m = shares.size
    reference = np.full(m, 1.0 / m)
    deviations = shares - reference
    value = m / (2.0 * (m - 1)) * float(np.abs(deviations).sum())
    return EDMResult(
        edm=min(max(value, 0.0), 1.0), shares=shares, deviations=deviations, reference=reference
    )


def relative_edm(
    phi: Sequence[float] | np.ndarray,
    standalone_accuracy: Sequence[float] | np.ndarray,
    chance: float,
) -> EDMResult:
    """Relative EDM: do modalities contribute in proportion to what each can do alone?

    The reference shares are ``q_m = max(acc_m - chance, 0)`` normalised to sum 1 (uniform
    if all are 0), from each modality's stand-alone validation accuracy; the value is the
    total-variation distance ``1/2 sum |p_m - q_m|`` in [0, 1] (our choice).
    """
    shares = contribution_shares(phi)
    acc = np.asarray(standalone_accuracy, dtype=float)
    if acc.shape != shares.shape:
        raise ValueError(
            f"need one stand-alone accuracy per modality: {acc.size} for {shares.size}"
        )
    above = np.clip(acc - chance, 0.0, None)
    reference = above / above.sum() if above.sum() > 0 else np.full(shares.size, 1.0 / shares.size)
    deviations = shares - reference
    value = 0.5 * float(np.abs(deviations).sum())
    return EDMResult(
        edm=min(max(value, 0.0), 1.0), shares=shares, deviations=deviations, reference=reference
    )


def minor_modalities(result: EDMResult, names: Sequence[str]) -> list[str]:
    """Modalities below their reference share, most negative deviation first."""
    order = np.argsort(result.deviations, kind="stable")
    return [names[i] for i in order if result.deviations[i] < 0]
