"""Behaviour of the training loop and of the two core strategies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from equimodal.config import build_config
from equimodal.data.registry import load_dataset
from equimodal.engine.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from equimodal.engine.trainer import Trainer, build_model, load_run
from equimodal.strategies.shapley_alternating import ShapleyAlternatingStrategy


def test_scheduler_puts_the_weak_modality_first(small_config):
    """After one epoch on data with a known weak modality (m2), m2 is trained first."""
    config = small_config(epochs=1)
    result = Trainer(config, progress=False).fit()
    row = result.history[1]
    assert row["order"] == ["m0", "m1", "m2"]  # the first epoch uses the dataset order
    phi = row["val"]["shapley"]
    assert phi["m2"] < phi["m1"] < phi["m0"], phi
    assert row["next_order"][0] == "m2"
    assert row["next_order"] == ["m2", "m1", "m0"]


def test_shapley_in_history_satisfies_efficiency(small_config):
    result = Trainer(small_config(epochs=2), progress=False).fit()
    for row in result.history:
        val = row["val"]
        total = sum(val["shapley"].values())
        assert total == pytest.approx(val["v_all"] - val["v_empty"], abs=1e-9)
        assert 0.0 <= val["edm"] <= 1.0


def test_alternating_step_trains_only_the_current_encoder(small_config):
    """Within one batch, step k changes encoder pi_k and leaves the others untouched."""
    config = small_config(epochs=1)
    data = load_dataset(config.dataset.name, seed=0, **config.dataset.options)
    model = build_model(config, data.info)
    from equimodal.strategies import TrainContext

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = ShapleyAlternatingStrategy(config.strategy)
    strategy.setup(TrainContext(model, optimizer, data.modalities, data.num_classes, seed=0))
    strategy.on_epoch_start(1)
    batch = next(data.train.batches(32))
    snapshots = []

    def spy(loss, _orig=strategy.context.optimizer_step):
        snapshots.append(
            {m: [p.detach().clone() for p in model.modality_parameters(m)] for m in data.modalities}
        )
        _orig(loss)

    strategy.context.optimizer_step = spy
    strategy.training_step(batch)
    after = {m: [p.detach().clone() for p in model.modality_parameters(m)] for m in data.modalities}
    snapshots.append(after)
    order = strategy.epoch_order
    for k, m in enumerate(order):
        before, later = snapshots[k], snapshots[k + 1]
        for n in data.modalities:
            changed = any(not torch.equal(a, b) for a, b in zip(before[n], later[n], strict=True))
            assert changed == (n == m), (k, m, n)


def test_alternating_step_skips_a_modality_no_sample_of_the_batch_has(small_config):
    """The first modality of the order absent from the whole batch: the later steps read
    the others (before, its missing features raised KeyError)."""
    config = small_config(epochs=1)
    data = load_dataset(config.dataset.name, seed=0, **config.dataset.options)
    model = build_model(config, data.info)
    from equimodal.strategies import TrainContext

    strategy = ShapleyAlternatingStrategy(config.strategy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy.setup(TrainContext(model, optimizer, data.modalities, data.num_classes, seed=0))
    strategy.on_epoch_start(1)
    batch = next(data.train.batches(8))
    batch.present[strategy.epoch_order[0]] = torch.zeros(8, dtype=torch.bool)
    logs = strategy.training_step(batch)
    assert set(logs) >= {f"loss_{m}" for m in strategy.epoch_order[1:]}
    assert f"loss_{strategy.epoch_order[0]}" not in logs


def test_same_seed_gives_identical_metrics(small_config):
    a = Trainer(small_config(epochs=2), progress=False).fit().metrics
    b = Trainer(small_config(epochs=2), progress=False).fit().metrics
    assert a["test"] == b["test"]
    assert a["val"] == b["val"]


def test_different_seed_changes_the_run(small_config):
    a = Trainer(small_config(epochs=1), progress=False).fit().metrics
    cfg = small_config(epochs=1, extra=["seed=1"])
    b = Trainer(cfg, progress=False).fit().metrics
    assert a["test"] != b["test"]


@pytest.mark.parametrize("fusion", ["concat", "sum", "late", "memory"])
def test_joint_trains_with_every_fusion(small_config, fusion):
    result = Trainer(
        small_config("joint", epochs=6, extra=[f"model.fusion={fusion}"]), progress=False
    ).fit()
    test = result.metrics["test"]
    assert test["accuracy"] > 0.5  # 4 classes: chance is 0.25
    assert set(test["shapley"]) == {"m0", "m1", "m2"}


@pytest.mark.parametrize(
    "option",
    [
        "strategy.alternate_every=epoch",
        "strategy.order_by=edm",
        "strategy.order_by=random",
        "strategy.value=neg_loss",
        "strategy.value=true_class_prob",
        "strategy.inference=train_order",
        "strategy.inference=best_val_order",
        "strategy.shapley_momentum=0.5",
    ],
)
def test_shapley_alternating_options_run(small_config, option):
    result = Trainer(small_config(epochs=2, extra=[option]), progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.4


def test_epoch_alternation_changes_order_only_between_rounds(small_config):
    result = Trainer(
        small_config(epochs=4, extra=["strategy.alternate_every=epoch"]), progress=False
    ).fit()
    orders = [tuple(r["order"]) for r in result.history[1:]]
    assert orders[0] == orders[1] == orders[2]  # one round of M=3 epochs keeps its order


def test_run_folder_files_and_checkpoint_round_trip(small_config, tmp_path):
    config = small_config(epochs=2)
    run = tmp_path / "run"
    result = Trainer(config, run_dir=run, progress=False).fit()
    for name in ("config.yaml", "history.jsonl", "metrics.json", "checkpoints/best.safetensors"):
        assert (run / name).is_file(), name
    lines = (run / "history.jsonl").read_text().splitlines()
    assert len(lines) == result.metrics["epochs_run"] + 1
    assert json.loads(lines[1])["order"] == ["m0", "m1", "m2"]
    assert not list(run.rglob("*.tmp"))
    _, model, strategy, data = load_run(run)
    from equimodal.engine.validation import class_prior, encode_split, evaluate_cache

    cache = encode_split(model, data.test)
    report = evaluate_cache(
        model,
        cache,
        "test",
        class_prior(data.train.labels, data.num_classes),
        strategy.inference_kwargs(),
    )
    assert report.accuracy == pytest.approx(result.metrics["test"]["accuracy"])
    assert report.to_dict()["shapley"] == pytest.approx(result.metrics["test"]["shapley"])


def test_checkpoint_rejects_other_model_and_garbage(small_config, tmp_path):
    config = small_config(epochs=1)
    data = load_dataset(config.dataset.name, seed=0, **config.dataset.options)
    model = build_model(config, data.info)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, {"epoch": 1})
    state, meta, _ = read_checkpoint(path)
    assert meta["epoch"] == 1
    other = build_model(build_config({}, ["model.dim=8", "dataset.name=synthetic"]), data.info)
    from equimodal.engine.checkpoint import load_model_state

    with pytest.raises(CheckpointError, match="does not fit"):
        load_model_state(other, state, str(path))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        read_checkpoint(bad)


def test_checkpoint_round_trip_keeps_optimizer_state(small_config, tmp_path):
    config = small_config(epochs=1)
    data = load_dataset(config.dataset.name, seed=0, **config.dataset.options)
    model = build_model(config, data.info)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(next(data.train.batches(16))).logits.sum().backward()
    opt.step()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, {"epoch": 3}, opt)
    state, meta, opt_state = read_checkpoint(path)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(opt_state)
    for k, v in opt.state_dict()["state"].items():
        for key, t in v.items():
            np.testing.assert_array_equal(
                np.asarray(t), np.asarray(fresh.state_dict()["state"][k][key])
            )
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_test_split_never_tunes_inference(small_config, monkeypatch):
    """best_val_order is chosen on validation; the final test scoring must not re-choose it."""
    seen = []
    original = ShapleyAlternatingStrategy.prepare_inference

    def spy(self, cache):
        seen.append(len(cache))
        return original(self, cache)

    monkeypatch.setattr(ShapleyAlternatingStrategy, "prepare_inference", spy)
    config = small_config(epochs=2, extra=["strategy.inference=best_val_order"])
    data = load_dataset(config.dataset.name, seed=0, **config.dataset.options)
    Trainer(config, data=data, progress=False).fit()
    assert seen and set(seen) == {len(data.val)} and len(data.test) != len(data.val)


def test_train_context_generator_follows_the_run_seed():
    from equimodal.strategies import TrainContext

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def draws(seed):
        ctx = TrainContext(model, optimizer, ("a", "b"), 2, seed=seed)  # type: ignore[arg-type]
        return torch.rand(4, generator=ctx.generator)

    assert torch.equal(draws(3), draws(3))
    assert not torch.equal(draws(3), draws(4))
