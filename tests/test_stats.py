"""Statistics of the bench table: paired differences with confidence intervals, Holm."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from equimodal.apps.stats import compare_to_reference, holm, paired_comparison


def test_holm_matches_the_step_down_definition():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005 (x4), 0.01 (x3), 0.03 (x2), 0.04 (x1), then running maximum
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


def test_paired_comparison_interval_and_p_value():
    rng = np.random.default_rng(0)
    ref = rng.normal(0.9, 0.01, 10)
    method = ref + rng.normal(0.01, 0.005, 10)
    c = paired_comparison(method, ref)
    d = method - ref
    half = stats.t.ppf(0.975, 9) * d.std(ddof=1) / math.sqrt(10)
    assert c.n == 10 and c.diff == pytest.approx(d.mean())
    assert (c.ci_low, c.ci_high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert c.p == pytest.approx(stats.ttest_rel(method, ref).pvalue)
    with pytest.raises(ValueError, match=">= 2 values"):
        paired_comparison([0.9], [0.8])


def _metrics(dataset, label, scores):
    return [
        {"dataset": dataset, "run": label, "seed": s, "test": {"accuracy": v}}
        for s, v in enumerate(scores)
    ]


def test_compare_to_reference_corrects_over_the_whole_table():
    ref = [0.90, 0.91, 0.89, 0.92, 0.90]
    clear = [v + d for v, d in zip(ref, [0.05, 0.051, 0.049, 0.052, 0.05], strict=True)]
    marginal = [v + d for v, d in zip(ref, [0.02, 0.01, 0.003, 0.02, 0.004], strict=True)]
    metrics = [
        *_metrics("a", "ref", ref),
        *_metrics("a", "clear", clear),
        *_metrics("a", "marginal", marginal),
        *_metrics("b", "ref", ref),
        *_metrics("b", "same", ref),
    ]
    table = compare_to_reference(metrics, "ref")
    assert set(table) == {("a", "clear"), ("a", "marginal"), ("b", "same")}
    raw = [table[k].p for k in table]
    assert [table[k].p_holm for k in table] == pytest.approx(holm(raw))
    assert table[("a", "clear")].survives()
    assert table[("a", "marginal")].p < 0.05 < table[("a", "marginal")].p_holm  # lost to Holm
    assert not table[("a", "marginal")].survives()
    assert table[("b", "same")].diff == 0.0 and not table[("b", "same")].survives()
