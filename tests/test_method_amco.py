"""AMCo (Zhou et al., ICASSP 2023) as BalanceBenchmark implements it
(``balancemm/trainer/AMCo_trainer.py``, ``BaseClassifierAMCoModel``): the mask-ratio
schedule, the mask, one training step recomputed by hand (dropout on, three modalities)
and the choice of the dependent modality."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import equimodal.strategies.amco  # noqa: F401  (registers "amco")
from equimodal.data.batch import MultimodalBatch
from equimodal.engine.trainer import Trainer
from equimodal.strategies.amco import dependence_shares, mask_ratio, random_mask

from .interrupt import KillAt, Killed, strip_times
from .method_kit import method_config
from .method_kit import set_up as setup


def config_for(modalities: int = 3, epochs: int = 3, extra=()):
    return method_config("amco", modalities, epochs, extra)


# ---------------------------------------------------------------------------- the rule
def test_mask_ratio_schedule_by_hand():
    assert mask_ratio(0.0, 0.3) == 0.0
    assert mask_ratio(0.1, 0.3) == pytest.approx(math.sin(math.pi / 6))  # 0.5
    assert mask_ratio(0.2, 0.3) == pytest.approx(math.sin(math.pi / 3))
    assert mask_ratio(0.3, 0.3) == pytest.approx(1.0)
    assert mask_ratio(5.0, 0.3) == pytest.approx(1.0)


@pytest.mark.parametrize(("size", "ratio", "zeros"), [(4, 0.5, 2), (4, 0.866, 3), (16, 0.7, 11)])
def test_random_mask_zeroes_int_ratio_times_size_positions(size, ratio, zeros):
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(size)
    draws = 800
    for _ in range(draws):
        mask = random_mask(size, ratio, g)
        assert set(mask.tolist()) <= {0.0, 1.0}
        assert int((mask == 0).sum()) == zeros  # N = int(p_t * size), BalanceBenchmark's
        counts += mask == 0
    # every position equally likely: 4 standard deviations
    p = zeros / size
    sd = math.sqrt(p * (1 - p) / draws)
    assert bool(((counts / draws - p).abs() < 4 * sd).all())
    assert random_mask(4, 1.0, g).sum() == 0 and random_mask(4, 0.0, g).sum() == 4


def test_dependence_shares_by_hand():
    logits = {"a": torch.tensor([[2.0, 0.0], [1.0, 1.0]]), "b": torch.tensor([[0.0, 0.0]] * 2)}
    present = {m: torch.ones(2, dtype=torch.bool) for m in logits}
    shares = dependence_shares(logits, present)
    e = math.e
    row0 = (e**2 + 1) / (e**2 + 1 + 2)
    row1 = 2 * e / (2 * e + 2)
    assert shares["a"] == pytest.approx((row0 + row1) / 2)
    assert shares["a"] + shares["b"] == pytest.approx(1.0)
    # an absent modality gets no mass in its rows
    present["b"] = torch.tensor([True, False])
    shares = dependence_shares(logits, present)
    assert shares["a"] == pytest.approx((row0 + 1.0) / 2)


# ---------------------------------------------------------------------------- a step
def amco_step_by_hand(model, strategy, batch, seed, ratio):
    """BalanceBenchmark's ``training_step`` in the window, written out for M modalities:
    ``u_m = z_m W_m^T + b / M``, a dependent modality's ``u_m`` times the class mask,
    ``fused = sum_m u_m``, ``CE(fused) + sum_m CE(u_m)``; then the dependence flags
    ``share_m > sigma``. Uses a copy of the strategy's generator for the mask."""
    g = torch.Generator()
    g.set_state(strategy.generator.get_state())
    mask = random_mask(model.num_classes, ratio, g)
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    z = model.encode(batch)
    weights = model.decision_weights()
    bias = model.head_parameters()[1]
    u = {m: z[m] @ weights[m].T + bias / len(model.modalities) for m in model.modalities}
    for m, dep in strategy.dependent.items():
        if dep:
            u[m] = u[m] * mask
    fused = sum(u.values())
    loss = F.cross_entropy(fused, batch.labels)
    loss = loss + sum(F.cross_entropy(u[m], batch.labels) for m in model.modalities)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    probs = torch.softmax(torch.cat([u[m].detach() for m in model.modalities], 1), 1)
    c = model.num_classes
    shares = {
        m: float(probs[:, k * c : (k + 1) * c].sum()) / len(batch)
        for k, m in enumerate(model.modalities)
    }
    flags = {m: s > strategy.config.sigma for m, s in shares.items()}
    return grads, float(loss.detach()), mask, flags


@pytest.mark.parametrize("modalities", [2, 3])
def test_step_is_balancebenchmarks_with_dropout_on(modalities):
    data, model, strategy = setup(config_for(modalities, extra=["model.encoder.dropout=0.3"]))
    strategy.on_epoch_start(3)  # l grows by 0.1 * (3 - 1) = 0.2 per batch
    expected_ratios = [0.0, math.sin(math.pi / 3), 1.0, 1.0]
    for t, batch in enumerate(list(data.train.batches(64))[:4]):
        strategy.dependent = {m: m == "m0" for m in model.modalities}  # m0 dependent
        grads, loss, mask, flags = amco_step_by_hand(
            model, strategy, batch, seed=50 + t, ratio=expected_ratios[t]
        )
        assert int((mask == 0).sum()) == int(expected_ratios[t] * 4)
        torch.manual_seed(50 + t)
        logs = strategy.training_step(batch)
        assert logs["loss"] == pytest.approx(loss, rel=1e-5)
        assert logs["mask_ratio"] == int(expected_ratios[t] * 4) / 4
        assert logs["masked_m0"] == 1.0 and logs["masked_m1"] == 0.0  # the weaker: never
        assert strategy.dependent == flags
        for name, p in model.named_parameters():
            if name in grads:
                torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-4)


def test_features_variant_masks_int_ratio_times_width_positions_of_the_dependent():
    extra = ["model.encoder.dropout=0", "strategy.mask_on=features"]
    data, model, strategy = setup(config_for(2, extra=extra))
    strategy.on_epoch_start(2)  # l grows by 0.1 per batch: p_t = 0, 0.5, 0.866, 1
    batch = next(data.train.batches(32))
    z_ref = {m: v.detach() for m, v in model.encode(batch).items()}
    seen = []
    fuse = model.fuse

    def spy(z, present, **kw):
        seen.append({m: v.detach() for m, v in z.items()})
        return fuse(z, present, **kw)

    model.fuse = spy
    for _ in range(4):
        strategy.dependent = {"m0": True, "m1": False}
        strategy.training_step(batch)
    model.fuse = fuse
    for z, ratio in zip(seen, [0.0, 0.5, math.sin(math.pi / 3), 1.0], strict=True):
        zeroed = (z["m0"] == 0).all(0)  # the same positions in every row
        assert int(zeroed.sum()) == int(ratio * model.dim)
        torch.testing.assert_close(z["m0"][:, ~zeroed], z_ref["m0"][:, ~zeroed])
        assert torch.equal(z["m1"], z_ref["m1"])  # the other modality is not masked


def test_the_stronger_modality_becomes_dependent_and_is_masked_next():
    """Two modalities, ``m0`` much stronger: after some joint training its share of the
    softmax mass exceeds sigma, so the next step masks m0 and never m1."""
    data, model, strategy = setup(config_for(2, extra=["model.encoder.dropout=0"]), lr=0.05)
    strategy.on_epoch_start(1)  # epoch 1: p_t stays 0, nothing is masked
    batches = list(data.train.batches(64))
    for batch in batches * 3:
        logs = strategy.training_step(batch)
        assert logs["mask_ratio"] == 0.0
    assert logs["share_m0"] > 0.5 > logs["share_m1"]
    assert strategy.dependent == {"m0": True, "m1": False}
    strategy.on_epoch_start(4)  # flags and ramp reset at the start of an epoch
    assert strategy.dependent == {"m0": False, "m1": False} and strategy.ramp_count == 0.0
    first = strategy.training_step(batches[0])  # decides; masks nothing yet
    assert first["masked_m0"] == 0.0 and strategy.dependent["m0"]
    second = strategy.training_step(batches[1])  # l = 0.3: p_t = 1
    assert second["masked_m0"] == 1.0 and second["masked_m1"] == 0.0
    assert second["mask_ratio"] == 1.0
    # all of m0's logits zeroed: its unimodal loss is log C
    assert second["loss_m0"] == pytest.approx(math.log(4), rel=1e-5)


def test_outside_the_window_is_joint_training():
    extra = ["strategy.modulation_end=5", "model.encoder.dropout=0"]
    data, model, strategy = setup(config_for(2, extra=extra))
    batch = next(data.train.batches(64))
    strategy.on_epoch_start(6)
    logs = strategy.training_step(batch)
    assert set(logs) == {"loss"}
    by_hand = F.cross_entropy(model(batch).logits, batch.labels).detach()
    assert logs["loss"] == pytest.approx(float(by_hand))


def test_missing_rows_leave_their_unimodal_loss():
    data, model, strategy = setup(config_for(2, extra=["model.encoder.dropout=0"]))
    strategy.on_epoch_start(1)
    batch = next(data.train.batches(8))
    present = {"m0": torch.ones(8, dtype=torch.bool), "m1": torch.arange(8) >= 4}
    batch = MultimodalBatch(batch.inputs, present, batch.labels, batch.indices)
    logs = strategy.training_step(batch)
    z = model.encode(batch)
    u1 = model.modality_logits("m1", z["m1"])
    by_hand = F.cross_entropy(u1[4:], batch.labels[4:]).detach()
    assert logs["loss_m1"] == pytest.approx(float(by_hand))


# ---------------------------------------------------------------------------- runs
@pytest.mark.parametrize(
    ("modalities", "missing", "mask_on"), [(3, 0.0, "logits"), (2, 0.3, "features")]
)
def test_short_training_run_learns(modalities, missing, mask_on):
    extra = [
        "model.encoder.dropout=0.3",
        f"train.missing_rate={missing}",
        f"strategy.mask_on={mask_on}",
        "strategy.sigma=0.4",  # three modalities: m0 holds ~0.45 of the mass
    ]
    result = Trainer(config_for(modalities, epochs=3, extra=extra), progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.7  # chance: 0.25
    assert result.history[-1]["train"]["mask_ratio"] > 0  # something was masked


def test_resume_continues_exactly(tmp_path):
    extra = ["model.encoder.dropout=0.2", "train.patience=null"]
    config = config_for(2, epochs=3, extra=extra)
    ref = Trainer(config, run_dir=tmp_path / "ref", progress=False).fit()
    run = tmp_path / "killed"
    with pytest.raises(Killed):
        Trainer(config, run_dir=run, progress=False, callbacks=[KillAt(2, 2)]).fit()
    resumed = Trainer(config, run_dir=run, progress=False, resume=True).fit()
    assert strip_times(resumed.history) == strip_times(ref.history)
    assert resumed.strategy.state_dict() == ref.strategy.state_dict()
