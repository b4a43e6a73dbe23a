"""Cost of the four benchmark datasets on their test fixtures: prepare and one epoch.

For CREMA-D, Kinetics-Sounds, MVSA-Single and IEMOCAP this writes the tiny raw fixture the
tests use (the real folder layout), runs ``equimodal prepare`` in a subprocess (wall time
and peak RSS of that process), then ``equimodal train -c configs/<dataset>_joint.yaml
--epochs 1`` with the shipped config unchanged apart from the data root, no loader workers
and no relative EDM (full-size encoders: ResNet18 at 224 px, MiniLM for the ``llm``
configs), and reads the epoch's training and validation time from ``history.jsonl``.

The fixtures hold a few dozen items, so the epoch times are per-item costs of the real
encoders, not estimates of a full epoch on the real data; the script also prints the
seconds per training item. The last line is a JSON object of the measured values.

    python benchmarks/dataset_fixtures.py [--quick] [--device auto]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, emit, parser, print_table

sys.path.insert(0, str(REPO))
from tests.av_fixtures import make_cremad_raw, make_kinetics_raw  # noqa: E402
from tests.text_fixtures import make_iemocap_dialoguernn, make_mvsa_raw  # noqa: E402

CLI = [sys.executable, "-c", "from equimodal.apps.cli import main; main()"]


def run_measured(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """``(wall seconds, peak RSS in MiB)`` of one CLI call in its own process."""
    started = time.perf_counter()
    proc = subprocess.Popen(CLI + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"{' '.join(args[:3])} failed: {err.strip()[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


DATASETS = {
    "cremad": (lambda raw: make_cremad_raw(raw), ["joint"]),
    "kinetics_sounds": (lambda raw: make_kinetics_raw(raw), ["joint"]),
    "mvsa_single": (lambda raw: make_mvsa_raw(raw), ["joint", "llm"]),
    "iemocap": (lambda raw: make_iemocap_dialoguernn(raw), ["joint", "llm"]),
}
#: loader options the fixtures need (tiny splits), the configs' encoders untouched
EXTRA = {
    "iemocap": ["--set", "dataset.options.val_fraction=0.4"],
    "mvsa_single": [],
    "cremad": ["--set", "dataset.options.val_fraction=0.34"],
    "kinetics_sounds": ["--set", "dataset.options.val_fraction=0.4"],
}


def main() -> None:
    """Prepare each fixture, train one epoch with each config, print the costs."""
    args = parser(__doc__.splitlines()[0]).parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    names = ["iemocap"] if args.quick else list(DATASETS)
    rows, result = [], {}
    with tempfile.TemporaryDirectory(prefix="equimodal-fixtures-") as tmp:
        for name in names:
            make_raw, variants = DATASETS[name]
            raw, root = Path(tmp) / name / "raw", Path(tmp) / name / "root"
            make_raw(raw)
            prepare = ["prepare", name, "--raw", str(raw), "--out", str(root), "-q"]
            wall, rss = run_measured(prepare, env)
            result[f"prepare_s_{name}"] = round(wall, 2)
            result[f"prepare_peak_rss_mib_{name}"] = round(rss, 1)
            for variant in variants[:1] if args.quick else variants:
                out = Path(tmp) / name / "runs"
                config = REPO / "configs" / f"{name}_{variant}.yaml"
                train_args = [
                    "train", "-c", str(config), "--out", str(out), "--name", variant,
                    "--epochs", "1", "-q",
                    "--set", f"dataset.options.root={root}",
                    "--set", "dataset.options.num_workers=0",
                    "--set", "train.relative_edm=false",
                    *EXTRA[name],
                ]  # fmt: skip
                if args.device != "auto":  # auto: the trainer's own choice
                    train_args += ["--set", f"train.device={args.device}"]
                wall, train_rss = run_measured(train_args, env)
                history = [
                    json.loads(line)
                    for line in (out / variant / "history.jsonl").read_text().splitlines()
                ]
                metrics = json.loads((out / variant / "metrics.json").read_text())
                epoch = history[1]
                items = metrics["val"]["num_samples"]
                train_items = _train_items(root, name)
                rows.append(
                    [
                        name,
                        variant,
                        f"{result[f'prepare_s_{name}']:.1f}",
                        f"{rss:.0f}",
                        str(train_items),
                        f"{epoch['train_time_s']:.2f}",
                        f"{epoch['train_time_s'] / max(train_items, 1) * 1000:.0f}",
                        f"{epoch['eval_time_s']:.2f} ({items} items)",
                        f"{train_rss:.0f}",
                    ]
                )
                result[f"epoch_s_{name}_{variant}"] = epoch["train_time_s"]
                result[f"train_peak_rss_mib_{name}_{variant}"] = round(train_rss, 1)
    print_table(
        "Benchmark datasets on their test fixtures (full-size encoders, one epoch)",
        [
            "dataset",
            "config",
            "prepare s",
            "prepare peak RSS MiB",
            "train items",
            "epoch train s",
            "ms / item",
            "val s",
            "train peak RSS MiB",
        ],
        rows,
    )
    emit(result)


def _train_items(root: Path, name: str) -> int:
    from equimodal.data.registry import load_dataset

    options: dict[str, object] = {"root": str(root)}
    for arg in EXTRA[name]:
        if arg.startswith("dataset.options."):
            key, value = arg.removeprefix("dataset.options.").split("=")
            options[key] = float(value)
    return len(load_dataset(name, seed=0, **options).train)


if __name__ == "__main__":
    main()
