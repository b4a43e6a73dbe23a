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
        key
        for case in ("mfeat", "synthetic_m8", "synthetic_m12")
        for key in (
            *(
                f"{k}_overhead_{case}"
                for k in ("shapley", "hybrid_schedule", "per_coalition", "naive")
            ),
            f"selection_only_{case}",
            f"shapley_part_{case}",
        )
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
    "av_geometry.py": [
        f"{dataset}_{key}"
        for dataset in ("cremad", "kinetics_sounds")
        for key in (
            "alternating_vs_joint",
            "alternating_vs_joint_fastest_steps",
            "alternating_vs_joint_flops",
            "train_gflop_per_sample",
            "shapley_on_top_of_epoch",
            "evaluation_of_epoch",
            "validation_pass_of_epoch",
            "hybrid_vs_one_order",
            "hybrid_vs_one_order_cached",
            "step_joint_ms",
            "step_alt_ms",
            "encode_per_sample_ms",
            "plain_per_sample_ms",
            "shapley_per_sample_ms",
            "shapley_part_per_sample_ms",
            "one_per_sample_ms",
            "hybrid_per_sample_ms",
            "epoch_joint_s",
            "epoch_alt_s",
            "evaluation_s",
        )
    ],
    "loader_workers.py": [
        "items_per_s_0_workers",
        "items_per_s_2_workers",
        "items_per_s_4_workers",
        "speedup_2_workers",
        "speedup_4_workers",
    ],
}

#: values that are differences, not ratios: finite, of any sign
SIGNED = {
    "acc_diff_m6_val_pp",
    "acc_diff_m6_test_pp",
    # a difference of two timings of a few milliseconds: may fall below the noise
    *(
        f"{d}_{k}"
        for d in ("cremad", "kinetics_sounds")
        for k in ("shapley_on_top_of_epoch", "shapley_part_per_sample_ms")
    ),
}


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


GPU_SH = BENCHMARKS / "gpu.sh"


def run_gpu_sh(env_extra: dict[str, str], *args: str, timeout: int = 120):
    """``bash benchmarks/gpu.sh ARGS`` from the repository root with ``env_extra`` set."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env_extra}
    env["EQUIMODAL_PYTHON"] = sys.executable  # this test's interpreter, whatever the venv
    return subprocess.run(
        ["bash", str(GPU_SH), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=BENCHMARKS.parent,
        timeout=timeout,
    )


def test_gpu_sh_fails_fast_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = run_gpu_sh({"EQUIMODAL_BENCH_DEVICE": "cuda"}, timeout=60)
    assert result.returncode == 2
    assert "CUDA is not available" in result.stderr
    assert "EQUIMODAL_BENCH_DEVICE=cpu" in result.stderr


def test_gpu_sh_rejects_unknown_arguments():
    result = run_gpu_sh({"EQUIMODAL_BENCH_DEVICE": "cpu"}, "--full", timeout=30)
    assert result.returncode == 2
    assert "unknown argument" in result.stderr


def test_gpu_sh_cpu_quick_path_combines_json(tmp_path):
    """One job through gpu.sh's CPU fallback: the combined JSON line holds its result."""
    result = run_gpu_sh(
        {
            "EQUIMODAL_BENCH_DEVICE": "cpu",
            "EQUIMODAL_BENCH_ONLY": "av_geometry_fp32",
            "EQUIMODAL_BENCH_LOGS": str(tmp_path),
        },
        "--quick",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    combined = json.loads(result.stdout.strip().splitlines()[-1])
    assert combined["device"] == "cpu" and combined["quick"] is True
    assert combined["failed"] == {}
    ratios = combined["av_geometry_fp32"]
    assert sorted(k for k in ratios if k != "wall_s") == sorted(EXPECTED["av_geometry.py"])
    assert all(math.isfinite(v) for v in ratios.values())
    assert all(v > 0 for k, v in ratios.items() if k not in SIGNED)
    assert (tmp_path / "av_geometry_fp32.log").is_file()


@pytest.mark.slow
def test_gpu_sh_cpu_quick_path_runs_every_script(tmp_path):
    """Every job of gpu.sh --quick on the CPU (minutes on 2 cores)."""
    result = run_gpu_sh(
        {"EQUIMODAL_BENCH_DEVICE": "cpu", "EQUIMODAL_BENCH_LOGS": str(tmp_path)},
        "--quick",
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    combined = json.loads(result.stdout.strip().splitlines()[-1])
    assert combined["failed"] == {}, combined["failed"]
    for name in ("av_geometry_fp32", "av_geometry_bf16", "loader_workers", "hybrid_order"):
        assert name in combined
