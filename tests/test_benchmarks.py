"""The benchmark scripts run in CI-sized settings (``--quick``) and end with their JSON line.

No timing assertions: the scripts run in parallel on a shared machine. Each must exit 0
and end its output with one JSON object holding the expected keys, every value finite,
every ratio positive (accuracy differences may be zero or negative).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

EXPECTED = {
    "shapley_overhead.py": [
        f"{kind}_overhead_{case}"
        for case in ("mfeat", "synthetic_m8", "synthetic_m12")
        for kind in ("shapley", "per_coalition", "naive")
    ],
    "hybrid_order.py": [
        *(f"hybrid_{m}_{size}" for m in ("m3", "m6") for size in ("b1", "b64", "split")),
        "acc_diff_m6_val_pp",
        "acc_diff_m6_test_pp",
    ],
    "alternating_cost.py": ["alternating_vs_joint_memory", "alternating_vs_joint_concat"],
    "memory.py": ["peak_rss_gib", "peak_rss_over_target", "wall_s"],
    "dataset_fixtures.py": [
        "prepare_s_iemocap",
        "prepare_peak_rss_mib_iemocap",
        "epoch_s_iemocap_joint",
        "train_peak_rss_mib_iemocap_joint",
    ],
}

#: values that are differences, not ratios: finite, of any sign
SIGNED = {"acc_diff_m6_val_pp", "acc_diff_m6_test_pp"}


@pytest.fixture(scope="module")
def outputs() -> dict[str, subprocess.CompletedProcess]:
    """Every script with ``--quick``, all at once (each uses one thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(BENCHMARKS / name), "--quick", "--device", "cpu"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=BENCHMARKS.parent,
        )
        for name in EXPECTED
    }
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_script_ends_with_json_of_its_ratios(outputs, script):
    result = outputs[script]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) > 1, result.stdout  # a table comes before the JSON line
    ratios = json.loads(lines[-1])
    assert isinstance(ratios, dict)
    assert sorted(ratios) == sorted(EXPECTED[script])
    for key, value in ratios.items():
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
        if key not in SIGNED:
            assert value > 0, (key, value)
    # exactly one JSON line, and it is the last
    assert sum(line.lstrip().startswith("{") for line in lines) == 1


def test_readme_lists_every_script():
    readme = (BENCHMARKS / "README.md").read_text()
    for script in EXPECTED:
        assert script in readme
