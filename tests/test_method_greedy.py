"""``greedy`` (Wu et al., ICML 2022; github.com/nyukat/greedy_multimodal_learning): the
MMTM block, the conditional utilisation rates and learning speeds, and the re-balancing
schedule, each recomputed by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import equimodal.strategies.greedy  # noqa: F401  (registers the strategy)
from equimodal.engine.trainer import Trainer
from equimodal.engine.validation import FeatureCache
from equimodal.models.greedy_fusion import MMTMFusion
from equimodal.strategies.greedy import (
    imbalance,
    learning_speed,
    speed_ratio,
    utilisation_rate,
)

from .method_kit import first_batches as batches
from .method_kit import method_config
from .method_kit import set_up as setup


def config_for(modalities: int = 3, epochs: int = 3, extra=()):
    return method_config("greedy", modalities, epochs, extra)


# ---------------------------------------------------------------------------- the block
def gate_by_hand(fusion: MMTMFusion, squeezes: list[torch.Tensor], m: str) -> torch.Tensor:
    e = torch.relu(torch.cat(squeezes, 1) @ fusion.squeeze.weight.T + fusion.squeeze.bias)
    ex = fusion.excite[m]
    return torch.sigmoid(e @ ex.weight.T + ex.bias)


def test_mmtm_block_by_hand_three_modalities():
    torch.manual_seed(0)
    names = ("a", "b", "c")
    fusion = MMTMFusion(names, dim=5, num_classes=3)
    assert fusion.squeeze.out_features == int(2 * 15 / 4)
    z = {m: torch.randn(6, 5) for m in names}
    present = {m: torch.ones(6, dtype=torch.bool) for m in names}
    present["c"][[1, 4]] = False
    fusion.train()
    out = fusion(z, present)
    # the fill of absent rows is the running mean (zeros before any tracking)
    s = {m: torch.where(present[m].unsqueeze(1), z[m], torch.zeros(5)) for m in names}
    gates = {m: gate_by_hand(fusion, [s[k] for k in names], m) for m in names}
    branch = {m: fusion.heads[m](z[m] * gates[m]) for m in names}
    torch.testing.assert_close(out.branch_logits["a"], branch["a"])
    weight = torch.stack([present[m].float() for m in names], 1)  # (B, M)
    mean = sum(branch[m] * weight[:, k : k + 1] for k, m in enumerate(names)) / weight.sum(
        1, keepdim=True
    )
    torch.testing.assert_close(out.logits, mean)
    # the cumulative running means (one forward so far): present rows only
    torch.testing.assert_close(fusion.gate_mean[2], gates["c"][present["c"]].mean(0))
    torch.testing.assert_close(fusion.squeeze_mean[0], z["a"].mean(0))
    first_gate_b = gates["b"].mean(0)
    # second forward: (mean + avg * 1) / 2
    z2 = {m: torch.randn(6, 5) for m in names}
    ones = {m: torch.ones(6, dtype=torch.bool) for m in names}
    fills = fusion.squeeze_mean.clone()
    out2 = fusion(z2, ones)
    g2 = gate_by_hand(fusion, [z2[k] for k in names], "b")
    torch.testing.assert_close(fusion.gate_mean[1], (g2.mean(0) + first_gate_b) / 2)
    # isolating branch a: the others' squeezes are the (pre-update) running means
    fusion.eval()
    iso = fusion(z2, ones, isolate=["a"])
    ga = gate_by_hand(
        fusion,
        [
            z2["a"],
            fills[1].expand(6, 5) * 0 + fusion.squeeze_mean[1],
            fusion.squeeze_mean[2].expand(6, 5),
        ],
        "a",
    )
    torch.testing.assert_close(iso.branch_logits["a"], fusion.heads["a"](z2["a"] * ga))
    torch.testing.assert_close(iso.branch_logits["b"], out2.branch_logits["b"])  # unchanged
    # a given reference replaces them
    ref = {m: torch.randn(5) for m in names}
    iso_ref = fusion(z2, ones, isolate="a", reference=ref)
    ga = gate_by_hand(fusion, [z2["a"], ref["b"].expand(6, 5), ref["c"].expand(6, 5)], "a")
    torch.testing.assert_close(iso_ref.branch_logits["a"], fusion.heads["a"](z2["a"] * ga))
    # re-balancing branch c: its gate is the running average, the others unchanged
    reb = fusion(z2, ones, rebalance="c")
    torch.testing.assert_close(
        reb.branch_logits["c"], fusion.heads["c"](z2["c"] * fusion.gate_mean[2])
    )
    torch.testing.assert_close(reb.branch_logits["a"], out2.branch_logits["a"])
    # evaluation passes do not track; a modality's own logits are its isolated branch
    before = fusion.gate_mean.clone()
    own = fusion.unimodal_logits({"b": z2["b"]})["b"]
    gb = gate_by_hand(
        fusion,
        [fusion.squeeze_mean[0].expand(6, 5), z2["b"], fusion.squeeze_mean[2].expand(6, 5)],
        "b",
    )
    torch.testing.assert_close(own, fusion.heads["b"](z2["b"] * gb))
    assert torch.equal(fusion.gate_mean, before)


def test_rebalanced_branch_reads_nothing_of_the_other_modalities():
    torch.manual_seed(1)
    fusion = MMTMFusion(("a", "b"), dim=4, num_classes=3)
    fusion.train()
    z = {m: torch.randn(5, 4, requires_grad=True) for m in ("a", "b")}
    ones = {m: torch.ones(5, dtype=torch.bool) for m in ("a", "b")}
    out = fusion(z, ones, rebalance="a")
    (grad_b,) = torch.autograd.grad(out.branch_logits["a"].sum(), z["b"], allow_unused=True)
    assert grad_b is None or float(grad_b.abs().max()) == 0.0
    out = fusion(z, ones)
    (grad_b,) = torch.autograd.grad(out.branch_logits["a"].sum(), z["b"])
    assert float(grad_b.abs().max()) > 0  # the cross-modal connection, when on


# ---------------------------------------------------------------------------- utilisation
def test_utilisation_rate_by_hand():
    labels = torch.tensor([0, 1, 2, 0])
    on = F.one_hot(torch.tensor([0, 1, 2, 1]), 3).float()  # 3 of 4 right
    off = F.one_hot(torch.tensor([0, 2, 2, 1]), 3).float()  # 2 of 4 right
    rows = torch.ones(4, dtype=torch.bool)
    assert utilisation_rate(on, off, labels, rows) == pytest.approx((0.75 - 0.5) / 0.75)
    rows = torch.tensor([True, True, False, False])  # 2/2 with, 1/2 without
    assert utilisation_rate(on, off, labels, rows) == pytest.approx(0.5)
    wrong = F.one_hot(torch.tensor([1, 0, 0, 1]), 3).float()
    assert utilisation_rate(wrong, off, labels, torch.ones(4, dtype=torch.bool)) == 0.0


def test_conditional_utilisation_from_the_fusion_outputs():
    config = config_for(3, extra=["model.encoder.dropout=0.3"])
    data, model, strategy = setup(config)
    model.train()
    for batch in batches(data, 3):  # some tracking, so the running means are not zero
        model.fuse(model.encode(batch), batch.present)
    torch.manual_seed(3)
    z = {m: torch.randn(40, model.dim) for m in model.modalities}
    present = {m: torch.rand(40) > 0.2 for m in model.modalities}
    labels = torch.randint(0, 4, (40,))
    cache = FeatureCache(z=z, present=present, labels=labels)
    before = model.fusion.gate_mean.clone()
    strategy.prepare_inference(cache)
    assert model.training and torch.equal(model.fusion.gate_mean, before)
    fusion = model.fusion
    fusion.eval()
    with torch.no_grad():
        on = fusion(z, present, track=False).branch_logits
        means = {m: z[m][present[m]].mean(0) for m in model.modalities}
        for m in model.modalities:
            off = fusion(z, present, isolate=[m], reference=means, track=False).branch_logits[m]
            rows = present[m]
            acc_on = (on[m][rows].argmax(1) == labels[rows]).float().mean()
            acc_off = (off[rows].argmax(1) == labels[rows]).float().mean()
            expected = float((acc_on - acc_off) / acc_on)
            assert strategy.utilisation[m] == pytest.approx(expected, abs=1e-6)
    assert set(strategy.epoch_log()["utilisation"]) == set(model.modalities)


# ---------------------------------------------------------------------------- speed
def test_learning_speed_by_hand_with_dropout():
    config = config_for(3, extra=["model.encoder.dropout=0.3"])
    data, model, strategy = setup(config)  # lr 0: the parameters stay as they are
    batch = batches(data, 1)[0]
    model.train()
    torch.manual_seed(11)
    logs = strategy.training_step(batch)
    # by hand: the official blend loss, then ||g||^2 / ||theta||^2 of each group
    torch.manual_seed(11)
    z = model.encode(batch)
    branch = model.fuse(z, batch.present).branch_logits
    loss = sum(F.cross_entropy(branch[m], batch.labels) for m in model.modalities)
    assert logs["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    model.zero_grad()
    loss.backward()
    fusion = model.fusion

    def ratio(params):
        g = sum(float((p.grad**2).sum()) for p in params if p.grad is not None)
        return g / sum(float((p.detach() ** 2).sum()) for p in params)

    bdr = {}
    for m in model.modalities:
        main = ratio(model.modality_parameters(m, with_head=True))
        bypass = ratio([*fusion.squeeze.parameters(), *fusion.excite[m].parameters()])
        assert strategy.speed_main[m] == pytest.approx(main, rel=1e-5)
        assert strategy.speed_bypass[m] == pytest.approx(bypass, rel=1e-5)
        bdr[m] = math.log10(bypass / main)
        assert strategy.bdr[m] == pytest.approx(bdr[m], rel=1e-5)
    assert strategy.gap == pytest.approx(max(bdr.values()) - min(bdr.values()), rel=1e-5)
    # the second step adds to the sums (official M_main, M_bypass)
    first = dict(strategy.speed_main)
    strategy.training_step(batch)
    assert all(strategy.speed_main[m] > first[m] for m in first)


def test_speed_helpers():
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    p.grad = torch.tensor([1.0, 2.0])
    q = torch.nn.Parameter(torch.tensor([1.0]))  # no gradient: counts 0
    assert speed_ratio([p, q]) == pytest.approx(5.0 / 26.0)
    assert learning_speed({"a": 1.0, "b": 0.0}, {"a": 1.0, "b": 1.0}) is None
    bdr = learning_speed({"a": 1.0, "b": 2.0}, {"a": 10.0, "b": 2.0})
    assert bdr == {"a": pytest.approx(1.0), "b": pytest.approx(0.0)}
    assert imbalance(bdr) == (pytest.approx(1.0), "a")


# ---------------------------------------------------------------------------- schedule
def test_rebalancing_starts_exactly_when_the_gap_exceeds_the_threshold():
    config = config_for(2)
    data, model, probe = setup(config)
    batch = batches(data, 1)[0]
    probe.on_epoch_start(2)
    torch.manual_seed(0)
    probe.training_step(batch)
    gap, top = probe.gap, max(probe.bdr, key=probe.bdr.get)
    assert gap > 0
    for delta, starts in ((-1e-9, True), (1e-9, False)):
        cfg = config_for(2, extra=[f"strategy.threshold={gap + delta!r}"])
        _, model, strategy = setup(cfg)
        strategy.on_epoch_start(2)
        torch.manual_seed(0)
        strategy.training_step(batch)
        assert strategy.gap == pytest.approx(gap, rel=1e-9)
        assert strategy.rebalancing is starts
        if starts:
            assert strategy.caring == top  # the largest BDR
    # before start_epoch nothing is re-balanced, whatever the gap
    cfg = config_for(2, extra=["strategy.threshold=0.0"])
    _, model, strategy = setup(cfg)
    strategy.on_epoch_start(1)
    strategy.training_step(batch)
    assert not strategy.rebalancing and strategy.speed_main["m0"] > 0


def test_schedule_window_and_measuring():
    """Scripted imbalances: a trigger starts ``window`` re-balancing steps, which measure
    nothing; the step after them is regular and measures again."""
    config = config_for(2, extra=["strategy.window=3", "strategy.threshold=0.5"])
    _, _, strategy = setup(config)
    strategy.on_epoch_start(2)
    script = iter([(0.1, "m0"), (0.7, "m1"), (0.2, "m0"), (0.9, "m0")])
    calls = []

    def measure():
        calls.append(len(states))
        return next(script)

    strategy.measure = measure
    states = []
    for _ in range(9):
        states.append((strategy.rebalancing, strategy.caring if strategy.rebalancing else None))
        strategy.after_backward()
    assert states == [
        (False, None),  # measures 0.1
        (False, None),  # measures 0.7 > 0.5: the next 3 steps re-balance m1
        (True, "m1"),
        (True, "m1"),
        (True, "m1"),
        (False, None),  # measures 0.2
        (False, None),  # measures 0.9: m0
        (True, "m0"),
        (True, "m0"),
    ]
    assert calls == [1, 2, 6, 7]  # the 1-based steps that measured


@pytest.mark.parametrize("loss_mode", ["all", "cared"])
def test_rebalancing_step_updates_the_cared_branch_alone(loss_mode):
    config = config_for(3, extra=[f"strategy.rebalance_loss={loss_mode}"])
    data, model, strategy = setup(config, lr=0.5)
    first, batch = batches(data, 2)
    strategy.training_step(first)  # a regular step: some running averages
    strategy.rebalancing, strategy.caring, strategy.rebalance_step = True, "m1", 0
    fusion = model.fusion
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logs = strategy.training_step(batch)
    assert logs["rebalance_m1"] == 1.0 and logs["rebalance_m0"] == 0.0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    cared = {
        n
        for n, p in model.named_parameters()
        if any(p is q for q in model.modality_parameters("m1", with_head=True))
    }
    excite_m1 = {f"fusion.excite.m1.{k}" for k in ("weight", "bias")}
    assert not changed & excite_m1  # the connection into m1 gets no gradient
    assert cared <= changed
    if loss_mode == "cared":
        assert changed == cared  # nothing but branch m1
    else:  # official: the other branches and the shared squeeze train as usual
        assert {"fusion.excite.m0.weight", "fusion.squeeze.weight"} <= changed
    assert fusion.tracked[1] == 2


def test_missing_rows_leave_their_branch_out_of_the_loss():
    config = config_for(3)
    data, model, strategy = setup(config)
    batch = batches(data, 1, size=16)[0]
    batch.present["m2"][::2] = False
    torch.manual_seed(0)
    logs = strategy.training_step(batch)
    torch.manual_seed(0)  # the same dropout draws
    z = model.encode(batch)
    branch = model.fuse(z, batch.present).branch_logits
    rows = batch.present["m2"]
    expected = F.cross_entropy(branch["m2"][rows], batch.labels[rows])
    assert logs["loss_m2"] == pytest.approx(float(expected.detach()), rel=1e-5)


# ---------------------------------------------------------------------------- runs
def test_greedy_trains_three_modalities_with_dropout():
    config = config_for(3, epochs=4, extra=["model.encoder.dropout=0.3"])
    result = Trainer(config, progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.6  # chance: 0.25
    last = result.history[-1]
    assert set(last["utilisation"]) == {"m0", "m1", "m2"}
    assert set(last["learning_speed"]) == {"m0", "m1", "m2"}
    assert sum(last["train"][f"rebalance_{m}"] for m in ("m0", "m1", "m2")) > 0


def test_greedy_needs_its_fusion():
    with pytest.raises(ValueError, match="mmtm"):
        config_for(2, extra=["model.fusion=concat"])


def test_resume_from_the_state_continues_exactly():
    config = config_for(2, extra=["strategy.threshold=0.0", "strategy.window=3"])
    data, model, strategy = setup(config, lr=0.1)
    strategy.on_epoch_start(2)
    steps = batches(data, 6)
    torch.manual_seed(0)
    for batch in steps[:3]:
        strategy.training_step(batch)
    assert strategy.rebalancing  # stopped inside a re-balancing window
    state = json.loads(json.dumps(strategy.state_dict()))
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    for batch in steps[3:]:
        strategy.training_step(batch)
    _, model2, strategy2 = setup(config, lr=0.1)
    model2.load_state_dict(saved_model)
    strategy2.load_state_dict(state)
    torch.manual_seed(1)
    for batch in steps[3:]:
        strategy2.training_step(batch)
    for (n, p), q in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    assert strategy2.state_dict() == strategy.state_dict()
