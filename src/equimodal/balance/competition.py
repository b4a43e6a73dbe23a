"""AGM's competition strength (Li et al., ICCV 2023).

How much of a modality's own knowledge survives fusion. The *mono-modal concept* ``U_m``
is the feature a separately trained unimodal model of ``m`` gives each sample. A ridge
regression (alpha 120) maps the fused feature ``Z`` of the multimodal model to ``U_m``; it
is fitted on data held out of training (equimodal uses the validation split) and scored on
test: with residual ``E`` and scatter ``B = N Cov(U_m)``,
``r_m = trace(pinv(B) E^T E) / d``. Near 0: ``Z`` still carries ``m``'s concept (little
competition); near 1: fusion has lost it (``Z`` predicts ``U_m`` no better than its mean).

This module is the math; :mod:`equimodal.analysis.competition` trains the unimodal
models and feeds it.
"""

from __future__ import annotations

import numpy as np

RIDGE_ALPHA = 120.0


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression with an unpenalised intercept: ``(W, b)`` with ``y ~ x W + b``."""
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc + alpha * np.eye(x.shape[1])
    w = np.linalg.solve(gram, xc.T @ yc)
    return w, y_mean - x_mean @ w


def competition_strength(
    z_fit: np.ndarray,
    u_fit: np.ndarray,
    z_test: np.ndarray,
    u_test: np.ndarray,
    alpha: float = RIDGE_ALPHA,
) -> float:
    """``trace(pinv(B) E^T E) / d`` of a ridge map from fused features to one concept."""
    for name, arr in (("z_fit", z_fit), ("u_fit", u_fit), ("z_test", z_test), ("u_test", u_test)):
        if arr.ndim != 2 or arr.shape[0] < 2:
            raise ValueError(f"{name} must be a matrix with at least 2 rows, got {arr.shape}")
    if z_fit.shape[0] != u_fit.shape[0] or z_test.shape[0] != u_test.shape[0]:
        raise ValueError("fused features and concepts must have the same number of rows")
    w, b = ridge_fit(z_fit.astype(np.float64), u_fit.astype(np.float64), alpha)
    u = u_test.astype(np.float64)
    residual = u - (z_test.astype(np.float64) @ w + b)
    centred = u - u.mean(0)
    scatter = centred.T @ centred
    return float(np.trace(np.linalg.pinv(scatter) @ (residual.T @ residual)) / u.shape[1])
