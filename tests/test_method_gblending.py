"""Gradient-Blending (Wang, Tran, Feiszli, CVPR 2020), online as in BalanceBenchmark
(``balancemm/trainer/GBlending_trainer.py``): per-head loss weights ``|G_k| / O_k^2``,
normalised, from each head's train and validation losses at the first and the last epoch
of a super-epoch, used in the next super-epoch."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import equimodal.strategies.gblending  # noqa: F401
from equimodal.config import build_config
from equimodal.core.files import dumps_json
from equimodal.data.registry import load_dataset
from equimodal.engine.callbacks import Callback
from equimodal.engine.trainer import Trainer, build_model
from equimodal.engine.validation import encode_split
from equimodal.strategies import TrainContext, build_strategy
from equimodal.strategies.gblending import FUSED, ogr_weights

from .conftest import small_overrides


# ---------------------------------------------------------------------------- the formula
def test_weights_follow_the_ogr_formula_on_a_hand_made_history():
    # (train loss, validation loss) at the first and the last epoch of a super-epoch
    start = {"a": (1.0, 1.2), "b": (1.5, 1.6), FUSED: (0.9, 1.1)}
    end = {"a": (0.4, 0.9), "b": (1.3, 1.5), FUSED: (0.2, 1.2)}
    weights, gains, overfits = ogr_weights(start, end)
    # G = V(s) - V(e); O = (V(e) - T(e)) - (V(s) - T(s))
    assert gains == pytest.approx({"a": 0.3, "b": 0.1, FUSED: -0.1})
    assert overfits == pytest.approx({"a": 0.3, "b": 0.1, FUSED: 0.8})
    raw = {"a": 0.3 / 0.3**2, "b": 0.1 / 0.1**2, FUSED: 0.1 / 0.8**2}  # |G| / O^2
    total = sum(raw.values())
    assert weights == pytest.approx({k: v / total for k, v in raw.items()})
    assert sum(weights.values()) == pytest.approx(1.0)
    # the paper's reading of G as a gain: a head whose validation loss rose gets 0
    zeroed, _, _ = ogr_weights(start, end, negative_gain="zero")
    total = raw["a"] + raw["b"]
    assert zeroed == pytest.approx({"a": raw["a"] / total, "b": raw["b"] / total, FUSED: 0.0})


def test_degenerate_histories():
    start = {"a": (1.0, 1.0), "b": (1.0, 1.0)}
    # no overfitting change: O^2 is floored, the head with a gain takes (nearly) all
    weights, _, _ = ogr_weights(start, {"a": (0.9, 0.9), "b": (0.5, 1.0)})
    assert weights["a"] == pytest.approx(1.0) and weights["b"] == 0.0
    assert ogr_weights(start, dict(start)) is None  # no gain anywhere: keep the weights
    assert ogr_weights(start, {"a": (0.9, math.nan), "b": (0.5, 1.0)}) is None


# ---------------------------------------------------------------------------- the schedule
def config_for(extra=(), epochs: int = 3):
    data_opts = (
        "dataset.options={num_samples: 600, num_classes: 4, num_modalities: 3, "
        "signal: [3.0, 1.5, 0.4]}"
    )
    return build_config(
        {},
        [*small_overrides("gblending", epochs), data_opts, "model.encoder.dropout=0.3", *extra],
    )


def head_losses_by_hand(model, batch, modalities):
    out = model(batch, with_unimodal=True)
    losses = {m: F.cross_entropy(out.unimodal_logits[m], batch.labels) for m in modalities}
    losses[FUSED] = F.cross_entropy(out.logits, batch.labels)
    return losses


def test_weights_are_reestimated_from_the_train_and_validation_history():
    """Driven through its hooks as the loop does (dropout on, three modalities, super-epoch
    of 2): equal weights first, then the OGR weights of epochs 1 and 2 from losses
    recomputed by hand; the third epoch's loss is the new weighted sum."""
    config = config_for(["strategy.super_epoch=2"])
    data = load_dataset(config.dataset.name, seed=0, **config.dataset.options)
    torch.manual_seed(0)
    model = build_model(config, data.info)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    strategy = build_strategy(config.strategy)
    strategy.setup(TrainContext(model, optimizer, data.modalities, data.num_classes, seed=0))
    heads = (*data.modalities, FUSED)
    assert strategy.weights == {k: 0.25 for k in heads}
    history = {}
    seed = 0
    for epoch in (1, 2, 3):
        before = dict(strategy.weights)
        strategy.on_epoch_start(epoch)
        model.train()
        sums = {k: 0.0 for k in heads}
        batches = list(data.train.batches(64))[:4]
        for batch in batches:
            seed += 1
            torch.manual_seed(seed)
            with torch.no_grad():
                hand = head_losses_by_hand(model, batch, data.modalities)
            torch.manual_seed(seed)  # the step draws the same dropout masks
            logs = strategy.training_step(batch)
            assert logs["loss"] == pytest.approx(sum(before[k] * float(hand[k]) for k in heads))
            for k in heads:
                sums[k] += float(hand[k])
        # the validation split, as the loop scores it (eval mode, cached features)
        cache = encode_split(model, data.val)
        strategy.prepare_inference(cache)
        model.eval()
        with torch.no_grad():
            val = head_losses_by_hand(model, _whole(data.val), data.modalities)
        model.train()
        history[epoch] = {k: (sums[k] / len(batches), float(val[k])) for k in heads}
        strategy.on_epoch_end(epoch, report=None)
        if epoch == 1:
            assert strategy.weights == before  # not the end of a super-epoch
    # the estimate at the end of epoch 2 (G, O from epochs 1 and 2) is in force in epoch 3
    expected = {}
    for k in heads:
        (t0, v0), (t1, v1) = history[1][k], history[2][k]
        expected[k] = abs(v0 - v1) / ((v1 - t1) - (v0 - t0)) ** 2
    total = sum(expected.values())
    assert before == pytest.approx({k: w / total for k, w in expected.items()}, rel=1e-4)
    assert before != {k: 0.25 for k in heads}
    assert strategy.estimate["epoch"] == 2
    # epoch 3 opened a new super-epoch: its first checkpoint is kept
    assert set(strategy.start) == set(heads)
    for k in heads:
        assert strategy.start[k] == pytest.approx(history[3][k], rel=1e-5)


def _whole(split):
    return next(split.batches(len(split)))


class ValidationOnly(Callback):
    """After each validation: the strategy's head losses are those of the validation
    split, not of the test split."""

    def __init__(self) -> None:
        self.checked = 0
        self.caches = 0

    def on_fit_start(self, trainer, state):
        strategy, val = state.strategy, state.splits["val"]
        prepare = strategy.prepare_inference

        def prepare_and_check(cache):
            assert torch.equal(cache.labels, val.labels)  # validation features only
            self.caches += 1
            prepare(cache)

        strategy.prepare_inference = prepare_and_check

    def on_validation_end(self, trainer, state, report):
        model, strategy = state.model, state.strategy
        names = state.info.modality_names
        was = model.training
        model.eval()
        with torch.no_grad():
            val = head_losses_by_hand(model, _whole(state.splits["val"]), names)
            test = head_losses_by_hand(model, _whole(state.splits["test"]), names)
        model.train(was)
        for k, v in val.items():
            assert strategy._val_losses[k] == pytest.approx(float(v), rel=1e-5)
            assert abs(float(test[k]) - float(v)) > 1e-6
        self.checked += 1


def test_gblending_trains_on_validation_losses_only():
    check = ValidationOnly()
    config = config_for(["strategy.super_epoch=2"], epochs=5)
    result = Trainer(config, progress=False, callbacks=[check]).fit()
    assert check.checked == 5
    assert check.caches == 5 + 1 + 1  # epoch 0, every epoch, the final scoring
    assert result.metrics["test"]["accuracy"] > 0.6  # chance is 0.25
    weights = [row["blend_weights"] for row in result.history]
    assert weights[1] == weights[2] == {k: 0.25 for k in weights[1]}  # first super-epoch
    assert weights[3] == weights[4] != weights[2]  # re-estimated after epoch 2
    assert weights[5] != weights[4]  # and after epoch 4
    assert all(sum(w.values()) == pytest.approx(1.0) for w in weights)


def test_missing_rows_train(tmp_path):
    config = config_for(["strategy.super_epoch=2", "train.missing_rate=0.3"], epochs=2)
    result = Trainer(config, progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.4
    estimate = result.history[2]["blend_estimate"]
    assert estimate["updated"] and all(math.isfinite(v) for v in estimate["gain"].values())


def test_state_round_trip_and_exact_resume(tmp_path):
    config = config_for(["strategy.super_epoch=2"], epochs=5)
    full = Trainer(config, run_dir=tmp_path / "full", progress=False).fit()

    class Stop(Callback):
        def on_epoch_end(self, trainer, state, row):
            if state.epoch == 3:  # mid super-epoch: its first checkpoint is in the state
                raise KeyboardInterrupt

    run_dir = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, run_dir=run_dir, progress=False, callbacks=[Stop()]).fit()
    resumed = Trainer(config, run_dir=run_dir, progress=False, resume=True).fit()
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a.get("blend_weights") == b.get("blend_weights")
        assert a.get("train") == b.get("train")
    assert full.metrics["test"] == resumed.metrics["test"]
    # the state is strict JSON (NaN as null) and loads back
    strategy = full.strategy
    strategy.start = {k: (math.nan, 1.0) for k in strategy.weights}
    state = json.loads(dumps_json(strategy.state_dict()))
    other = build_strategy(config.strategy)
    other.load_state_dict(state)
    assert other.weights == strategy.weights
    assert all(math.isnan(t) and v == 1.0 for t, v in other.start.values())


def test_a_modality_named_like_the_fused_head_is_refused():
    config = config_for()
    strategy = build_strategy(config.strategy)
    ctx = TrainContext(None, None, ("a", FUSED), 2, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fused"):
        strategy.setup(ctx)
