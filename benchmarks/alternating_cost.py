"""Epoch time of ``shapley_alternating`` relative to ``joint`` with the same encoders and
batch size.

Each method trains on mfeat (M = 6) through the real trainer with the default encoders
(MLP, hidden 256, common width 128) and batch size (64); the epoch time is the median of
the training times the trainer records (the first epoch, a warm-up, left out; the
evaluation after each epoch is not part of it). ``shapley_alternating`` takes M = 6
optimizer steps per batch, one per modality, each re-reading the memory chain over the
modalities trained so far in the batch (METHODS §1.3). Two references:

* ``joint`` with the memory fusion: the same model, one optimizer step per batch (the
  ratio the target is about);
* ``joint`` with its default fusion, concatenation (no memory chain at all).

Target: at most 1.3 against joint with the same model.

    python benchmarks/alternating_cost.py [--quick] [--device auto] [--reps 5]
"""

from __future__ import annotations

from typing import Any

from common import emit, median, parser, print_table, setup

from equimodal.config import build_config
from equimodal.data.registry import load_dataset
from equimodal.engine.trainer import Trainer

TARGET = 1.3

RUNS = [
    ("shapley_alternating", "shapley_alternating", "memory"),
    ("joint_memory", "joint", "memory"),
    ("joint_concat", "joint", "concat"),
]


def epoch_time(strategy: str, fusion: str, data, epochs: int, quick: bool, device: str) -> float:
    """Median training time of one epoch of ``strategy`` with ``fusion``."""
    overrides: dict[str, Any] = {
        "dataset": {"name": data.info.name},
        "strategy": {"name": strategy},
        "model": {"fusion": fusion},
        "train": {"epochs": epochs, "patience": None, "relative_edm": False, "device": device},
    }
    if quick:
        overrides["model"].update(dim=16, encoder={"hidden": 32})
        overrides["dataset"]["options"] = {"num_samples": 120}
    result = Trainer(build_config(overrides), data=data, progress=False).fit()
    rows = [row for row in result.history if row["epoch"] >= 2] or result.history[1:]
    return median([row["train_time_s"] for row in rows])


def main() -> None:
    """Time the three runs and print the table and the JSON line."""
    args = parser(__doc__.splitlines()[0]).parse_args()
    device = setup(args)
    reps = args.reps or (1 if args.quick else 5)
    epochs = 1 if args.quick else reps + 1
    if args.quick:
        data = load_dataset("synthetic", seed=0, num_samples=120)
    else:
        data = load_dataset("mfeat", seed=0)
    times = {
        key: epoch_time(strategy, fusion, data, epochs, args.quick, device.type)
        for key, strategy, fusion in RUNS
    }
    ratios = {
        "alternating_vs_joint_memory": times["shapley_alternating"] / times["joint_memory"],
        "alternating_vs_joint_concat": times["shapley_alternating"] / times["joint_concat"],
    }
    base = times["joint_memory"]
    print_table(
        f"Epoch time on {data.info.name} (M={len(data.info.modalities)}), median of {reps} "
        f"epochs; target <= {TARGET} against joint with the memory fusion",
        ["method", "fusion", "epoch s", "ratio to joint (memory)"],
        [[strategy, fusion, times[key], times[key] / base] for key, strategy, fusion in RUNS],
    )
    emit(ratios)


if __name__ == "__main__":
    main()
