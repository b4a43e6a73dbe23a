"""Equilibrium Deviation Metric (EDM) and relative EDM (our formula).

The paper (arXiv 2506.00030) introduces EDM without a public formula. Ours [our choice]:
from Shapley values ``phi_m`` of accuracy, the contribution shares
``p_m = max(phi_m, 0) / sum_k max(phi_k, 0)`` (all ``1/M`` when the sum is 0), the signed
deviations ``d_m = p_m - 1/M`` (negative: a minor modality) and

    EDM = M / (2 (M - 1)) * sum_m |d_m|      in [0, 1],

0 when every modality contributes equally, 1 when one modality carries everything.
EDM is the total-variation distance between ``p`` and the uniform shares, scaled by
``M / (M - 1)`` (the largest TV distance from uniform is ``(M - 1) / M``).

The relative EDM replaces the uniform reference by the modalities' stand-alone capability
shares ``q_m`` and is the plain (unscaled) total-variation distance ``1/2 sum |p_m - q_m|``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


@dataclass(frozen=True)
class EDMResult:
    """An EDM value with what it was computed from.

    ``edm`` is in [0, 1]; ``shares`` are the contribution shares ``p_m``; ``deviations`` the
    signed ``d_m = p_m - reference_m``; ``reference`` the reference shares used (uniform
    ``1/M`` for :func:`edm`, capability shares ``q_m`` for :func:`relative_edm`).
    """

    edm: float
    shares: np.ndarray
    deviations: np.ndarray
    reference: np.ndarray

    @property
    def percent(self) -> float:
        """EDM in percent."""
        return 100.0 * self.edm


def _normalise_positive(x: np.ndarray) -> np.ndarray:
    """``max(x, 0)`` normalised to sum 1 (uniform when no entry is positive)."""
    pos = np.clip(x, 0.0, None)
    total = pos.sum()
    return pos / total if total > 0 else np.full(x.size, 1.0 / x.size)


def contribution_shares(phi: ArrayLike) -> np.ndarray:
    """Contribution shares ``max(phi, 0)`` normalised to sum 1 (uniform when none positive)."""
    values = np.asarray(phi, dtype=float)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"EDM needs the values of at least 2 modalities, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("Shapley values must be finite")
    return _normalise_positive(values)


def _clip_unit(value: float) -> float:
    return min(max(value, 0.0), 1.0)


def edm(phi: ArrayLike) -> EDMResult:
    """EDM of Shapley values ``phi`` (one per modality, ``M >= 2``).

    ``EDM = M / (2 (M-1)) * sum_m |p_m - 1/M|``: the total-variation distance of the shares
    from uniform, scaled by ``M / (M-1)`` so a single contributor gives exactly 1.
    Raises ``ValueError`` for fewer than 2 modalities or non-finite values.
    """
    shares = contribution_shares(phi)
    m = shares.size
    reference = np.full(m, 1.0 / m)
    deviations = shares - reference
    value = m / (2.0 * (m - 1)) * float(np.abs(deviations).sum())
    return EDMResult(
        edm=_clip_unit(value), shares=shares, deviations=deviations, reference=reference
    )


def relative_edm(phi: ArrayLike, standalone_accuracy: ArrayLike, chance: float) -> EDMResult:
    """Relative EDM: do modalities contribute in proportion to what each can do alone?

    Reference shares ``q_m = max(acc_m - chance, 0)`` normalised to sum 1 (uniform if all
    are 0), from each modality's stand-alone validation accuracy ``acc_m``. The value is the
    total-variation distance between contribution and capability shares,
    ``1/2 * sum_m |p_m - q_m|`` in [0, 1] (our choice). It is *not* scaled by
    ``M / (M-1)`` as plain :func:`edm` is, so with uniform ``q`` it equals
    ``(M-1)/M * edm(phi)``; it reaches 1 only when ``p`` and ``q`` have disjoint support.
    """
    shares = contribution_shares(phi)
    acc = np.asarray(standalone_accuracy, dtype=float)
    if acc.shape != shares.shape:
        raise ValueError(
            f"need one stand-alone accuracy per modality: got {acc.size} for {shares.size}"
        )
    if not (np.all(np.isfinite(acc)) and np.isfinite(chance)):
        raise ValueError("stand-alone accuracies and chance must be finite")
    reference = _normalise_positive(acc - float(chance))
    deviations = shares - reference
    value = 0.5 * float(np.abs(deviations).sum())
    return EDMResult(
        edm=_clip_unit(value), shares=shares, deviations=deviations, reference=reference
    )


def minor_modalities(result: EDMResult, names: Sequence[str], tol: float = 1e-12) -> list[str]:
    """Names of the modalities below their reference share, most negative deviation first.

    Deviations within ``tol`` of 0 (rounding) do not count as negative.
    """
    if len(names) != result.deviations.size:
        raise ValueError(
            f"need one name per modality: got {len(names)} for {result.deviations.size}"
        )
    order = np.argsort(result.deviations, kind="stable")
    return [names[i] for i in order if result.deviations[i] < -tol]
