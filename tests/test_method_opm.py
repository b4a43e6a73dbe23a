"""OPM (Wei, Hu, Du, Wen, TPAMI 2024; github.com/GeWu-Lab/BML_TPAMI2024
``code/models/Classifier.py``): the drop probabilities by hand, the drops' statistics, and
one training step recomputed by hand (dropout on, three modalities)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import equimodal.strategies.opm  # noqa: F401  (registers "opm")
from equimodal.data.batch import MultimodalBatch
from equimodal.data.registry import load_dataset
from equimodal.engine.trainer import Trainer, build_model
from equimodal.strategies import TrainContext, build_strategy
from equimodal.strategies.opm import drop_probabilities, sample_keep_masks

from .interrupt import KillAt, Killed, strip_times
from .method_kit import method_config


def config_for(modalities: int = 3, epochs: int = 3, extra=()):
    return method_config("opm", modalities, epochs, extra)


def setup(config, lr: float = 0.0, warm_steps: int = 0):
    """Model, strategy, data; ``warm_steps`` joint steps (epoch 1, before OPM starts) at
    Adam lr 0.01 make ``m0`` lead; then the learning rate is ``lr``."""
    data = load_dataset(config.dataset.name, seed=0, **config.dataset.options)
    torch.manual_seed(0)
    model = build_model(config, data.info)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    strategy = build_strategy(config.strategy)
    strategy.setup(TrainContext(model, optimizer, data.modalities, data.num_classes, seed=0))
    strategy.on_epoch_start(1)
    batches = list(data.train.batches(64))
    for t in range(warm_steps):
        strategy.training_step(batches[t % len(batches)])
    for group in optimizer.param_groups:
        group["lr"] = lr
    return data, model, strategy


# ---------------------------------------------------------------------------- the rule
def test_drop_probabilities_by_hand():
    ratios, q = drop_probabilities({"a": 30.0, "b": 20.0}, q_base=0.5, lam=0.5)
    assert ratios == pytest.approx({"a": 1.5, "b": 20 / 30})
    assert q["a"] == pytest.approx(0.5 * (1 + 0.5 * math.tanh(0.5)))
    assert q["b"] == 0.0  # the official `if ratio > 0 else 0`
    # three modalities (ours): the mean of the others
    ratios, q = drop_probabilities({"a": 30.0, "b": 20.0, "c": 10.0}, q_base=0.4, lam=0.5)
    assert ratios == pytest.approx({"a": 2.0, "b": 1.0, "c": 0.4})
    assert q == pytest.approx({"a": 0.4 * (1 + 0.5 * math.tanh(1.0)), "b": 0.0, "c": 0.0})
    # clipped to 1
    _, q = drop_probabilities({"a": 100.0, "b": 1.0}, q_base=0.9, lam=1.0)
    assert q["a"] == 1.0 and q["b"] == 0.0
    # a tie: nobody leads, nobody is dropped
    assert drop_probabilities({"a": 5.0, "b": 5.0}, 0.5, 0.5)[1] == {"a": 0.0, "b": 0.0}


def test_keep_masks_have_the_stated_probabilities():
    g = torch.Generator().manual_seed(1)
    q = {"a": 0.6, "b": 0.0, "c": 0.25}
    batches, rows = 3000, 16
    executed, dropped = 0, {m: 0 for m in q}
    for _ in range(batches):
        keep = sample_keep_masks(q, rows, p_exe=0.7, generator=g)
        if keep is None:
            continue
        executed += 1
        for m in q:
            dropped[m] += int((~keep[m]).sum())
    # executed with probability p_exe: 4 standard deviations
    assert abs(executed / batches - 0.7) < 4 * math.sqrt(0.7 * 0.3 / batches)
    for m, qm in q.items():
        n = executed * rows
        assert abs(dropped[m] / n - qm) < 4 * math.sqrt(qm * (1 - qm) / n) + 1e-12, m
    assert dropped["b"] == 0  # the weak modality is never dropped


def test_p_exe_zero_and_one():
    g = torch.Generator().manual_seed(0)
    assert all(sample_keep_masks({"a": 0.5}, 4, 0.0, g) is None for _ in range(50))
    assert all(sample_keep_masks({"a": 0.5}, 4, 1.0, g) is not None for _ in range(50))


# ---------------------------------------------------------------------------- a step
def opm_step_by_hand(model, strategy, batch, seed):
    """The official loop, written out for M modalities: scores from the unimodal logits
    ``z_m W_m^T + b / M`` (detached), q, one execution draw, per-row keep masks, features
    times mask / (1 - theta), CE of the fused logits over the kept rows. Uses a copy of the
    strategy's generator, so it draws what the strategy will draw."""
    cfg = strategy.config
    g = torch.Generator()
    g.set_state(strategy.generator.get_state())
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    z = model.encode(batch)
    weights = model.decision_weights()
    bias = model.head_parameters()[1]
    names = model.modalities
    scores = {}
    for m in names:
        own = z[m].detach() @ weights[m].detach().T + bias.detach() / len(names)
        p = torch.softmax(own, 1)[torch.arange(len(batch)), batch.labels]
        scores[m] = float((p * batch.present[m]).sum())
    q = {}
    for m in names:
        others = [scores[k] for k in names if k != m]
        lead = math.tanh(max(scores[m] / (sum(others) / len(others)) - 1, 0.0))
        q[m] = min(cfg.q_base * (1 + cfg.lam * lead), 1.0) if lead > 0 else 0.0
    executed = float(torch.rand(1, generator=g)) >= 1 - cfg.p_exe
    rows = torch.ones(len(batch), dtype=torch.bool)
    keep = {m: torch.ones(len(batch), dtype=torch.bool) for m in names}
    if executed:
        u = torch.rand(len(batch), len(names), generator=g)
        theta = sum(q.values()) / len(names)
        keep = {m: u[:, k] >= q[m] for k, m in enumerate(names)}
        z = {m: z[m] * keep[m][:, None].float() / (1 - theta) for m in names}
        rows = torch.stack([keep[m] for m in names], 1).any(1)
    logits = model.fuse(z, batch.present).logits
    F.cross_entropy(logits[rows], batch.labels[rows]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads, q, keep, executed


@pytest.mark.parametrize("modalities", [2, 3])
def test_step_is_the_official_one_with_dropout_on(modalities):
    extra = ["model.encoder.dropout=0.3", "strategy.p_exe=0.8"]
    data, model, strategy = setup(config_for(modalities, extra=extra), lr=0.0, warm_steps=6)
    strategy.on_epoch_start(7)  # the first epoch after the official 6-epoch warm-up
    seen_drop = False
    for t, batch in enumerate(list(data.train.batches(64))[:6]):
        grads, q, keep, executed = opm_step_by_hand(model, strategy, batch, seed=100 + t)
        torch.manual_seed(100 + t)
        logs = strategy.training_step(batch)
        assert q["m0"] > 0  # m0 (the strong signal) leads
        for m in model.modalities:
            assert logs[f"q_{m}"] == pytest.approx(q[m], rel=1e-5)
            assert logs[f"drop_{m}"] == pytest.approx(float((~keep[m]).float().mean()))
            if q[m] == 0:
                assert bool(keep[m].all())  # a modality that does not lead is never dropped
        seen_drop |= executed and not bool(keep["m0"].all())
        for name, p in model.named_parameters():
            if name in grads:
                torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-4)
    assert seen_drop


def test_the_leader_is_dropped_with_its_probability_over_many_batches():
    """End to end: a fixed model (lr 0, no dropout) and one batch, so ``q`` is fixed; over
    many steps a batch's drop is executed (its features rescaled by ``1 / (1 - theta)``)
    with probability ``p_exe``, and then each row's leader is zeroed in the fused input
    with probability ``q``; the other modalities are never zeroed."""
    data, model, strategy = setup(config_for(3, extra=["model.encoder.dropout=0"]), warm_steps=8)
    strategy.on_epoch_start(7)
    batch = next(data.train.batches(64))
    z_ref = {m: v.detach() for m, v in model.encode(batch).items()}
    seen = []
    fuse = model.fuse

    def spy(z, present, **kw):
        seen.append({m: v.detach() for m, v in z.items()})
        return fuse(z, present, **kw)

    model.fuse = spy
    steps = 100
    q = None
    for _ in range(steps):
        logs = strategy.training_step(batch)
        q = {m: logs[f"q_{m}"] for m in model.modalities}
    model.fuse = fuse
    assert q["m0"] > 0.4 and q["m1"] == q["m2"] == 0.0
    theta = sum(q.values()) / 3
    executed, zeroed = 0, {m: 0 for m in model.modalities}
    for z in seen:
        if torch.equal(z["m2"], z_ref["m2"]):  # not executed: the features as they are
            assert all(torch.equal(z[m], z_ref[m]) for m in model.modalities)
            continue
        executed += 1
        for m in model.modalities:
            dropped = (z[m] == 0).all(1)
            zeroed[m] += int(dropped.sum())
            kept = ~dropped
            torch.testing.assert_close(z[m][kept] * (1 - theta), z_ref[m][kept])
    p_exe = strategy.config.p_exe
    assert abs(executed / steps - p_exe) < 4 * math.sqrt(p_exe * (1 - p_exe) / steps)
    n = executed * len(batch)
    assert abs(zeroed["m0"] / n - q["m0"]) < 4 * math.sqrt(q["m0"] * (1 - q["m0"]) / n)
    assert zeroed["m1"] == zeroed["m2"] == 0


def test_rows_left_without_a_present_modality_leave_the_loss(monkeypatch):
    data, model, strategy = setup(config_for(2, extra=["model.encoder.dropout=0"]), warm_steps=6)
    strategy.on_epoch_start(7)
    batch = next(data.train.batches(8))
    present = {"m0": torch.ones(8, dtype=torch.bool), "m1": torch.arange(8) >= 4}
    batch = MultimodalBatch(batch.inputs, present, batch.labels, batch.indices)
    # m0 dropped in rows 0, 1 (only m0 present there: they leave) and 5 (m1 keeps it)
    keep = {"m0": ~torch.isin(torch.arange(8), torch.tensor([0, 1, 5])), "m1": torch.ones(8) > 0}
    monkeypatch.setattr(equimodal.strategies.opm, "sample_keep_masks", lambda *a: keep)
    z = model.encode(batch)
    logs = strategy.training_step(batch)
    q = {m: logs[f"q_{m}"] for m in model.modalities}
    theta = sum(q.values()) / 2
    zd = {m: z[m] * keep[m][:, None].float() / (1 - theta) for m in model.modalities}
    logits = model.fuse(zd, present).logits
    rows = torch.arange(8) >= 2
    by_hand = F.cross_entropy(logits[rows], batch.labels[rows]).detach()
    assert logs["loss"] == pytest.approx(float(by_hand))
    # nothing kept at all: no optimizer step (the official `continue`)
    none = {m: torch.zeros(8, dtype=torch.bool) for m in model.modalities}
    monkeypatch.setattr(equimodal.strategies.opm, "sample_keep_masks", lambda *a: none)
    for group in strategy.context.optimizer.param_groups:
        group["lr"] = 1.0
    before = [p.detach().clone() for p in model.parameters()]
    logs = strategy.training_step(batch)
    assert logs["loss"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_no_drop_outside_the_modulation_epochs():
    extra = ["strategy.modulation_start=2", "strategy.modulation_end=3", "strategy.p_exe=1"]
    data, model, strategy = setup(config_for(2, extra=extra), warm_steps=4)
    batch = next(data.train.batches(64))
    for epoch, modulated in [(1, False), (2, True), (3, True), (4, False)]:
        strategy.on_epoch_start(epoch)
        assert ("q_m0" in strategy.training_step(batch)) is modulated, epoch
    default = build_strategy(config_for(2).strategy)
    assert [default.modulates(e) for e in (6, 7, 500)] == [False, True, True]


# ---------------------------------------------------------------------------- runs
@pytest.mark.parametrize("missing", [0.0, 0.3])
def test_short_training_run_learns(missing):
    extra = [
        "model.encoder.dropout=0.3",
        "strategy.modulation_start=1",
        f"train.missing_rate={missing}",
    ]
    result = Trainer(config_for(3, epochs=3, extra=extra), progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.7  # chance: 0.25
    train = result.history[-1]["train"]
    assert train["q_m0"] > 0 and train["drop_m0"] > 0 and train["drop_m2"] == 0


def test_resume_continues_exactly_and_the_seed_matters(tmp_path):
    extra = ["model.encoder.dropout=0.2", "train.patience=null", "strategy.modulation_start=2"]
    config = config_for(2, epochs=3, extra=extra)
    ref = Trainer(config, run_dir=tmp_path / "ref", progress=False).fit()
    run = tmp_path / "killed"
    with pytest.raises(Killed):
        Trainer(config, run_dir=run, progress=False, callbacks=[KillAt(2, 2)]).fit()
    resumed = Trainer(config, run_dir=run, progress=False, resume=True).fit()
    assert strip_times(resumed.history) == strip_times(ref.history)
    assert resumed.strategy.state_dict() == ref.strategy.state_dict()
    other = build_strategy(config.strategy)
    data, model, _ = setup(config)
    other.setup(TrainContext(model, None, data.modalities, data.num_classes, seed=1))
    first = build_strategy(config.strategy)
    first.setup(TrainContext(model, None, data.modalities, data.num_classes, seed=0))
    assert other.state_dict()["generator"] != first.state_dict()["generator"]
