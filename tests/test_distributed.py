"""Multi-process training: torchrun with 2 CPU processes (gloo) reproduces a 1-process run.

The global batch is the same in both runs, so the histories agree up to float rounding
(summation order differs). Dropout is 0: with dropout each rank draws its own masks and
the runs are statistically, not numerically, equivalent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from equimodal.config import build_config, load_yaml
from equimodal.data.registry import load_dataset
from equimodal.engine.distributed import Distributed, ShardContext
from equimodal.engine.trainer import Trainer

DATA = "dataset.options={num_samples: 500, num_classes: 4, signal: [3.0, 1.5, 0.4]}"
# 325 training samples: with batch 54 the last global batch has 1 row, so rank 1 trains
# on a stand-in row with weight 0 there
COMMON = [
    "--dataset", "synthetic", "-s", DATA, "--epochs", "2", "-s", "train.batch_size=54",
    "-s", "model.dim=16", "-s", "model.encoder.hidden=32", "-s", "model.encoder.dropout=0",
    "-s", "optim.lr=0.01", "-s", "train.relative_edm=false",
]  # fmt: skip


def _torchrun(tmp_path, args: list[str]):
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "equimodal", "train", "-q", "--out", str(out), *args]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return result, out, cwd


def _close(a, b, tol, where):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _close(a[k], b[k], tol, f"{where}.{k}")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=tol), where
    else:
        assert a == b, where


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [
        ("joint", []),
        # memory fusion (batch statistic, InfoNCE over the batch) and missing modalities
        # (some shards lack a modality or a memory pair another shard has)
        ("shapley_alternating", ["--train-missing-rate", "0.3"]),
    ],
)
def test_two_processes_match_one(tmp_path, strategy, extra):
    result, out, cwd = _torchrun(tmp_path, [*COMMON, "--strategy", strategy, *extra])
    assert result.returncode == 0, result.stderr[-4000:]
    # only rank 0 wrote files: one run folder, nothing elsewhere
    assert [p.name for p in out.iterdir()] == [f"synthetic-{strategy}-s0"]
    assert list(cwd.iterdir()) == []
    run_dir = out / f"synthetic-{strategy}-s0"
    assert {"config.yaml", "history.jsonl", "metrics.json"} <= {p.name for p in run_dir.iterdir()}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.safetensors",
        "last.safetensors",
    ]
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2

    config = build_config(load_yaml(run_dir / "config.yaml"))
    reference = Trainer(config, progress=False).fit()
    assert len(history) == len(reference.history) == 3
    for ours, theirs in zip(history, reference.history, strict=True):
        where = f"epoch {theirs['epoch']}"
        if "order" in theirs:  # the Shapley scheduler decided the same orders
            assert ours["order"] == theirs["order"] and ours["next_order"] == theirs["next_order"]
        _close(theirs.get("train", {}), ours.get("train", {}), 1e-4, f"{where} train")
        _close(theirs["val"], ours["val"], 1e-4, f"{where} val")
        assert ours["val"]["accuracy"] == pytest.approx(theirs["val"]["accuracy"], abs=1e-9)
    for split in ("val", "test"):
        _close(reference.metrics[split], metrics[split], 1e-4, split)
        assert metrics[split]["accuracy"] == pytest.approx(
            reference.metrics[split]["accuracy"], abs=1e-9
        )
    assert metrics["best_epoch"] == reference.metrics["best_epoch"]


def test_shards_cover_each_global_batch_once():
    """Every rank's rows of a global batch, together, are the one-process batch."""
    data = load_dataset("synthetic", seed=0, num_samples=200, num_classes=3)
    train = data.train  # 130 rows: batches of 64, 64 and 2 (rank 2 of 3 gets a stand-in)
    expected = [
        b.indices.tolist()
        for b in train.batches(64, shuffle=True, generator=torch.Generator().manual_seed(5))
    ]
    world = 3
    per_rank = []
    for rank in range(world):
        group = Distributed(active=True, rank=rank, world=world)
        generator = torch.Generator().manual_seed(5)
        per_rank.append(list(group._sharded_batches(train, 64, generator, 0.0)))
    for k, rows in enumerate(expected):
        shards: list[tuple] = [per_rank[r][k] for r in range(world)]
        real = [(b, s) for b, s in shards if s.real]
        assert sorted(i for b, _ in real for i in b.indices.tolist()) == sorted(rows)
        assert sum(s.weight for _, s in shards) == pytest.approx(1.0)
        for b, s in shards:
            assert isinstance(s, ShardContext)
            assert s.weight == (len(b) / len(rows) if s.real else 0.0)
    last = [per_rank[r][-1][1] for r in range(world)]
    assert [s.real for s in last] == [True, True, False]
    assert len(per_rank[2][-1][0]) == 1  # the stand-in row


def test_unsupported_strategy_is_refused(small_config):
    from equimodal.strategies import build_strategy

    group = Distributed(active=True, rank=0, world=2)
    with pytest.raises(ValueError, match="'udi' does not support multi-process training"):
        group.check_strategy(build_strategy(small_config("udi").strategy))
    group.check_strategy(build_strategy(small_config("shapley_alternating").strategy))
    Distributed().check_strategy(build_strategy(small_config("udi").strategy))  # one process


CLOSE_SCRIPT = """
import os, torch
from equimodal.engine.build import seed_everything
from equimodal.engine.distributed import Distributed

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
group, _ = Distributed.setup(torch.device("cpu"))
assert group.active and threads() > before  # gloo's worker and transport threads
seed_everything(0)  # torch.use_deterministic_algorithms imports torch's compiler stack
group.broadcast_object({"epoch": 1})
group.close()
assert threads() == before, (before, threads())
print("joined")
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_close_joins_the_process_group_threads(tmp_path):
    """After close() the group's threads are gone, so no rank can abort at exit while a
    gloo worker still releases tensors (seen as SIGABRT on loaded machines)."""
    script = tmp_path / "close.py"
    script.write_text(CLOSE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*cmd, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("joined") == 2
