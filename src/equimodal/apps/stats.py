"""Statistics for comparing methods over seeds, that survive many comparisons.

Each method of a bench table is compared with a reference method on the seeds both ran
(the same seed means the same split and initialisation, so the test is *paired*):

* the mean paired difference of test accuracy and its 95 % confidence interval
  (Student's t with ``n - 1`` degrees of freedom);
* the two-sided paired t-test p-value;
* **Holm's correction** over all comparisons of the table (every dataset x method against
  the reference): sort the ``m`` p-values, multiply the ``i``-th smallest by
  ``m - i + 1``, and make the sequence non-decreasing (capped at 1). A difference
  *survives* when its Holm-adjusted p-value is below ``alpha`` (0.05); this controls the
  family-wise error rate of the whole table, whatever the dependence between tests.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ALPHA = 0.05


@dataclass(frozen=True)
class Comparison:
    """A method against the reference over ``n`` paired seeds (differences: method - ref)."""

    n: int
    diff: float
    ci_low: float
    ci_high: float
    p: float
    p_holm: float = math.nan

    def survives(self, alpha: float = ALPHA) -> bool:
        """True when the Holm-adjusted p-value is below ``alpha``."""
        return not math.isnan(self.p_holm) and self.p_holm < alpha

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "n": self.n,
            "diff": self.diff,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "p": self.p,
            "p_holm": self.p_holm,
            "survives": self.survives(),
        }


def paired_comparison(
    values: Sequence[float], reference: Sequence[float], confidence: float = 0.95
) -> Comparison:
    """Mean paired difference, its confidence interval and the paired t-test's p-value."""
    from scipy import stats

    a = np.asarray(values, dtype=float)
    b = np.asarray(reference, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"a paired comparison needs two equal series of >= 2 values: {a.shape}")
    d = a - b
    n = len(d)
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    if sd == 0.0:  # identical differences: no spread, the test is undefined
        return Comparison(n, mean, mean, mean, 1.0 if mean == 0.0 else 0.0)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_rel(a, b).pvalue)
    return Comparison(n, mean, mean - half, mean + half, p)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def compare_to_reference(
    metrics: list[dict[str, Any]], reference: str, key: str = "accuracy"
) -> dict[tuple[str, str], Comparison]:
    """Every (dataset, method) against ``reference`` on their common seeds, Holm-corrected
    over all comparisons of the table (methods with fewer than 2 common seeds are left out).
    """
    by: dict[tuple[str, str], dict[int, float]] = {}
    for m in metrics:
        by.setdefault((m["dataset"], m["run"]), {})[m["seed"]] = m["test"][key]
    raw: dict[tuple[str, str], Comparison] = {}
    for (dataset, label), scores in sorted(by.items()):
        ref = by.get((dataset, reference))
        if label == reference or ref is None:
            continue
        seeds = sorted(set(scores) & set(ref))
        if len(seeds) < 2:
            continue
        raw[(dataset, label)] = paired_comparison(
            [scores[s] for s in seeds], [ref[s] for s in seeds]
        )
    keys = list(raw)
    adjusted = holm([raw[k].p for k in keys])
    return {
        k: Comparison(raw[k].n, raw[k].diff, raw[k].ci_low, raw[k].ci_high, raw[k].p, q)
        for k, q in zip(keys, adjusted, strict=True)
    }
