"""``reconboost`` (Hua et al., ICML 2024; github.com/huacong/ReconBoost, ``train.py``,
``train_MSA.py``, ``models/dynamic_net.py``): stages that each boost one modality against
the ensemble of the others with ``(1/C)(-w1 log p[y] + w2 q[y] log p[y]) + alpha * MSE``,
then rectify every trained modality with the fused cross-entropy; the modalities in a
fixed round robin."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import equimodal.strategies.reconboost  # noqa: F401  (registers it)
from equimodal.config import build_config
from equimodal.data.registry import load_dataset
from equimodal.engine.trainer import Trainer, build_model
from equimodal.strategies import TrainContext, build_strategy

from .conftest import small_overrides

NAMES = ("m0", "m1", "m2")


def config_for(modalities: int = 3, epochs: int = 3, extra=()):
    signal = "[3.0, 1.5, 0.4]" if modalities == 3 else "[3.0, 0.8]"
    data = (
        f"dataset.options={{num_samples: 400, num_classes: 4, num_modalities: {modalities}, "
        f"signal: {signal}}}"
    )
    schedule = ["strategy.boost_epochs=1", "strategy.rectify_epochs=1"]
    return build_config({}, [*small_overrides("reconboost", epochs), data, *schedule, *extra])


def setup_strategy(config, lr: float = 0.0):
    data = load_dataset(config.dataset.name, seed=0, **config.dataset.options)
    torch.manual_seed(0)
    model = build_model(config, data.info)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    strategy = build_strategy(config.strategy)
    strategy.setup(TrainContext(model, optimizer, data.modalities, data.num_classes, seed=0))
    return data, model, strategy


def first_batch(data, size: int = 64):
    return next(data.train.batches(size))


def snapshot(model):
    return {
        m: [p.detach().clone() for p in model.modality_parameters(m, with_head=True)]
        for m in model.modalities
    }


def changed(model, before) -> dict[str, bool]:
    return {
        m: any(
            not torch.equal(p, q)
            for p, q in zip(model.modality_parameters(m, with_head=True), before[m], strict=True)
        )
        for m in model.modalities
    }


# ---------------------------------------------------------------------------- the loss
def boosting_by_hand(model, batch, modality, ensemble, prev, cfg, seed, grad_consolidation):
    """The official phase-1 loss (``train_MSA.py``), the ensemble being the mean of the
    other trained modalities' logits (late fusion: their own heads)."""
    torch.manual_seed(seed)
    y = batch.labels
    with torch.no_grad():
        z = {k: model.encode_modality(k, batch.inputs[k]) for k in ensemble}
        out_join = sum(model.modality_logits(k, z[k]) for k in ensemble) / len(ensemble)
    out_obj = model.modality_logits(
        modality, model.encode_modality(modality, batch.inputs[modality])
    )
    c = out_obj.shape[1]
    target = F.one_hot(y, c).float()
    boost = (
        -cfg.weight1 * (target * out_obj.log_softmax(1)).mean(-1)
        + cfg.weight2 * (target * out_join.softmax(1) * out_obj.log_softmax(1)).mean(-1)
    ).mean()
    p_obj = out_obj.softmax(1) if grad_consolidation else out_obj.detach().softmax(1)
    pre = model.modality_logits(prev, z[prev]).detach().softmax(1)
    ga = F.mse_loss(p_obj, pre)
    return boost, ga, boost + cfg.alpha * ga


@pytest.mark.parametrize("grad_consolidation", [False, True])
def test_boosting_loss_and_gradients_by_hand_three_modalities_dropout_on(grad_consolidation):
    extra = [
        "model.encoder.dropout=0.3",
        "model.fusion=late",
        f"strategy.consolidation_gradient={str(grad_consolidation).lower()}",
    ]
    config = config_for(3, extra=extra)
    data, model, strategy = setup_strategy(config)  # lr 0: the parameters stay
    # boost 1 + rectify 1 epochs a stage: epoch 9 is stage 4's boosting, modality m1
    strategy.on_epoch_start(9)
    assert strategy.schedule(9) == (4, "boost", "m1")
    batch = first_batch(data)
    boost, ga, loss = boosting_by_hand(
        model, batch, "m1", ["m0", "m2"], "m0", config.strategy, 5, grad_consolidation
    )
    params = list(model.parameters())
    own_params = list(model.modality_parameters("m1"))
    want = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    boost_only = torch.autograd.grad(boost, own_params)
    boost, ga, loss = float(boost.detach()), float(ga.detach()), float(loss.detach())
    torch.manual_seed(5)
    logs = strategy.training_step(batch)
    assert logs["boost"] == pytest.approx(boost, rel=1e-5)
    assert logs["consolidation"] == pytest.approx(ga, rel=1e-5)
    assert logs["loss"] == pytest.approx(loss, rel=1e-5)
    assert ga > 0
    own = {id(p) for p in model.modality_parameters("m1", with_head=True)}
    for p, g in zip(params, want, strict=True):
        if id(p) in own:
            torch.testing.assert_close(p.grad, g, atol=1e-7, rtol=1e-5)
        else:  # the other modalities and their heads get no gradient at all
            assert p.grad is None
    # the consolidation term moves the gradient only when asked to
    same = all(
        torch.allclose(p.grad, g, atol=1e-7, rtol=1e-5)
        for p, g in zip(own_params, boost_only, strict=True)
    )
    assert same != grad_consolidation


def test_first_stage_has_an_empty_ensemble_and_no_consolidation():
    """Stage 0: ``q[y] = 1`` (the official ``c0``), so the loss is ``-(w1 - w2)/C log p[y]``."""
    config = config_for(2, extra=["model.encoder.dropout=0"])
    data, model, strategy = setup_strategy(config)
    strategy.on_epoch_start(1)
    batch = first_batch(data)
    logits = model.modality_logits("m0", model.encode_modality("m0", batch.inputs["m0"]))
    log_p = logits.log_softmax(1)[torch.arange(len(batch)), batch.labels]
    want = (-(5.0 - 1.0) / 4 * log_p).mean()
    logs = strategy.training_step(batch)
    assert logs["loss"] == pytest.approx(float(want.detach()), rel=1e-6)
    assert "consolidation" not in logs


def test_rows_missing_a_modality_are_left_out():
    config = config_for(3, extra=["model.encoder.dropout=0", "model.fusion=late"])
    data, model, strategy = setup_strategy(config)
    strategy.on_epoch_start(9)  # stage 4: boost m1 against m0 and m2, prev m0
    batch = first_batch(data, 8)
    batch.present["m1"][:2] = False
    batch.present["m0"][2:4] = False
    batch.present["m2"][2:5] = False  # rows 2, 3: no ensemble modality at all
    y = batch.labels
    with torch.no_grad():
        l0 = model.modality_logits("m0", model.encode_modality("m0", batch.inputs["m0"]))
        l2 = model.modality_logits("m2", model.encode_modality("m2", batch.inputs["m2"]))
    l1 = model.modality_logits("m1", model.encode_modality("m1", batch.inputs["m1"]))
    p0, p2 = batch.present["m0"][:, None].float(), batch.present["m2"][:, None].float()
    join = (l0 * p0 + l2 * p2) / (p0 + p2).clamp(min=1)  # the late fusion's present mean
    q = join.softmax(1)[torch.arange(8), y]
    q = torch.where((p0 + p2).squeeze(1) > 0, q, torch.ones_like(q))
    log_p = l1.log_softmax(1)[torch.arange(8), y]
    rows = batch.present["m1"]
    boost = ((-5.0 * log_p + 1.0 * q * log_p) / 4)[rows].mean()
    both = rows & batch.present["m0"]
    ga = F.mse_loss(l1.softmax(1)[both], l0.softmax(1)[both])
    logs = strategy.training_step(batch)
    assert logs["boost"] == pytest.approx(float(boost.detach()), rel=1e-5)
    assert logs["consolidation"] == pytest.approx(float(ga.detach()), rel=1e-5)


def test_rectification_is_the_fused_cross_entropy_of_the_trained_modalities():
    config = config_for(3, extra=["model.encoder.dropout=0", "model.fusion=shared"])
    data, model, strategy = setup_strategy(config)
    batch = first_batch(data)
    for epoch, names in [(2, ["m0"]), (4, ["m0", "m1"]), (6, list(NAMES)), (8, list(NAMES))]:
        strategy.on_epoch_start(epoch)
        assert strategy.schedule(epoch)[1] == "rectify"
        z = {k: model.encode_modality(k, batch.inputs[k]) for k in names}
        head = model.head_parameters()
        logits = sum(F.linear(z[k], head[0], head[1]) for k in names) / len(names)
        want = F.cross_entropy(logits, batch.labels)
        logs = strategy.training_step(batch)
        assert logs["loss"] == pytest.approx(float(want.detach()), rel=1e-6), epoch
        for m in NAMES:  # untrained modalities get no gradient
            grads = [p.grad for p in model.modality_parameters(m)]
            assert all((g is not None) == (m in names) for g in grads), (epoch, m)


# ---------------------------------------------------------------------------- the schedule
def test_round_robin_order_and_what_each_epoch_trains():
    extra = [
        "model.encoder.dropout=0.3",
        "model.fusion=late",
        "strategy.order=[m2, m0, m1]",
        "strategy.boost_epochs=2",
        "strategy.rectify_epochs=1",
    ]
    config = config_for(3, extra=extra)
    data, model, strategy = setup_strategy(config, lr=0.05)
    expected = [
        (0, "boost", "m2"), (0, "boost", "m2"), (0, "rectify", "m2"),
        (1, "boost", "m0"), (1, "boost", "m0"), (1, "rectify", "m0"),
        (2, "boost", "m1"), (2, "boost", "m1"), (2, "rectify", "m1"),
        (3, "boost", "m2"),
    ]  # fmt: skip
    assert [strategy.schedule(e) for e in range(1, 11)] == expected
    trained = {  # epoch -> the modalities whose parameters may change
        1: {"m2"}, 3: {"m2"}, 4: {"m0"}, 6: {"m0", "m2"}, 7: {"m1"}, 9: set(NAMES), 10: {"m2"},
    }  # fmt: skip
    inference = {1: ["m2"], 4: ["m0", "m2"], 7: list(NAMES)}
    for epoch in range(1, 11):
        strategy.on_epoch_start(epoch)
        before = snapshot(model)
        batches = data.train.batches(64)
        for _ in range(2):
            strategy.training_step(next(batches))
        if epoch in trained:
            moved = changed(model, before)
            assert {m for m, c in moved.items() if c} == trained[epoch], epoch
        if epoch in inference:
            kwargs = strategy.inference_kwargs()
            got = kwargs.get("modalities", list(NAMES))
            assert got == inference[epoch], epoch


def test_a_boosting_epoch_leaves_the_other_encoders_bit_identical_with_a_shared_head():
    config = config_for(3, extra=["model.encoder.dropout=0.3", "model.fusion=shared"])
    data, model, strategy = setup_strategy(config, lr=0.05)
    strategy.on_epoch_start(9)  # stage 4: m1
    before = {m: [p.detach().clone() for p in model.modality_parameters(m)] for m in NAMES}
    head = [p.detach().clone() for p in model.head_parameters()]
    for batch in data.train.batches(64):
        strategy.training_step(batch)
    for m in NAMES:
        same = all(
            torch.equal(p, q) for p, q in zip(model.modality_parameters(m), before[m], strict=True)
        )
        assert same == (m != "m1"), m
    # the shared head reads m1 too, so it learns with it (the official common space)
    assert any(not torch.equal(p, q) for p, q in zip(model.head_parameters(), head, strict=True))


def test_setup_checks_modalities_and_order():
    config = config_for(2, extra=["strategy.order=[m1, m9]"])
    with pytest.raises(ValueError, match="order"):
        setup_strategy(config)
    config = config_for(2)
    data = load_dataset(config.dataset.name, seed=0, **config.dataset.options)
    model = build_model(config, data.info)
    strategy = build_strategy(config.strategy)
    ctx = TrainContext(model, torch.optim.SGD(model.parameters(), lr=0.0), ("m0",), 4, seed=0)
    with pytest.raises(ValueError, match="has 1"):
        strategy.setup(ctx)


def test_state_round_trip():
    config = config_for(3)
    _, _, strategy = setup_strategy(config)
    strategy.on_epoch_start(3)
    state = json.loads(json.dumps(strategy.state_dict()))
    _, _, twin = setup_strategy(config)
    twin.load_state_dict(state)
    assert twin.epoch == 3
    assert twin.inference_kwargs() == strategy.inference_kwargs() == {"modalities": ["m0", "m1"]}
    assert twin.epoch_log() == {"stage": 1, "phase": "boost", "modality": "m1"}


def test_trains_with_missing_modalities():
    config = config_for(3, epochs=6, extra=["train.missing_rate=0.3", "model.encoder.dropout=0.2"])
    result = Trainer(config, progress=False).fit()
    assert [r["modality"] for r in result.history[1:]] == ["m0", "m0", "m1", "m1", "m2", "m2"]
    assert result.metrics["test"]["accuracy"] > 0.6  # chance: 0.25


def test_early_stopping_waits_until_every_modality_has_had_a_stage():
    """Patience restarts at the end of each stage until the last modality's first stage
    has begun (the official loop has no early stopping; it trains every modality)."""
    config = config_for(3, extra=["strategy.boost_epochs=2", "strategy.rectify_epochs=1"])
    _, _, strategy = setup_strategy(config)
    restarts = []
    for epoch in range(1, 13):
        strategy.on_epoch_start(epoch)
        restarts.append(strategy.restarts_patience())
    # stages of 3 epochs: the ends of stages 0 and 1 (epochs 3, 6) restart the count
    assert [e for e, r in enumerate(restarts, start=1) if r] == [3, 6]
