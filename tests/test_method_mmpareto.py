"""MMPareto (Wei and Hu, ICML 2024; github.com/GeWu-Lab/MMPareto_ICML2024,
``code/MMPareto.py``): per encoder, the multimodal and the unimodal gradient are combined
with equal weights when they agree and with the min-norm weights when they conflict, then
scaled to ``alpha * max(1, ||sum|| / ||h||)`` per parameter tensor."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import equimodal.strategies.mmpareto  # noqa: F401
from equimodal.config import build_config
from equimodal.data.batch import MultimodalBatch
from equimodal.data.registry import load_dataset
from equimodal.engine.trainer import Trainer, build_model
from equimodal.strategies import TrainContext, build_strategy
from equimodal.strategies.mmpareto import integrate, min_norm_gamma, pareto_weights

from .conftest import small_overrides

ALPHA = 1.5


# ---------------------------------------------------------------------------- the rule
def test_conflicting_pair_gets_the_closed_form_min_norm_point():
    g_mm = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    g_uni = torch.tensor([-1.0, 2.0, 0.0], dtype=torch.float64)
    k_mm, k_uni, cos = pareto_weights(g_mm, g_uni)
    assert cos == pytest.approx(-1 / math.sqrt(5))
    # min_c ||c g_mm + (1 - c) g_uni||^2: c = <g_uni, g_uni - g_mm> / ||g_mm - g_uni||^2
    # = ((-1)(-2) + 2 * 2) / (4 + 4) = 0.75
    assert k_mm == pytest.approx(0.75) and k_uni == pytest.approx(0.25)
    d = k_mm * g_mm + k_uni * g_uni
    torch.testing.assert_close(d, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    # the min-norm point of the segment: no other convex combination is shorter
    for c in torch.linspace(0, 1, 101, dtype=torch.float64):
        assert float((c * g_mm + (1 - c) * g_uni).norm()) >= float(d.norm()) - 1e-12
    # a common descent direction: equal, non-negative inner products with both
    assert float(d @ g_mm) == pytest.approx(0.5) and float(d @ g_uni) == pytest.approx(0.5)
    # the official rescaling: h = 2 d = (1, 1, 0), ||g_mm + g_uni|| = 2 > ||h|| = sqrt(2)
    new = integrate(g_mm + g_uni, g_mm, g_uni, k_mm, k_uni, ALPHA)
    expected = ALPHA * math.sqrt(2) * torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(new, expected)
    assert float(new @ g_mm) >= 0 and float(new @ g_uni) >= 0


def test_agreeing_pair_is_the_sum_scaled_by_alpha():
    g_mm = torch.tensor([1.0, 2.0, -1.0])
    g_uni = torch.tensor([3.0, 0.5, 0.0])
    k_mm, k_uni, cos = pareto_weights(g_mm, g_uni)
    assert cos > 0 and (k_mm, k_uni) == (0.5, 0.5)
    torch.testing.assert_close(
        integrate(g_mm + g_uni, g_mm, g_uni, k_mm, k_uni, ALPHA), ALPHA * (g_mm + g_uni)
    )


def test_rescaling_keeps_h_when_it_is_longer_than_the_sum():
    # per tensor, h may be longer than the plain sum: then only alpha scales it
    total = torch.tensor([0.1, 0.0])
    g_mm, g_uni = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    new = integrate(total, g_mm, g_uni, 0.8, 0.2, ALPHA)
    torch.testing.assert_close(new, ALPHA * torch.tensor([1.6, 0.4]))


def test_solver_end_points_and_degenerate_gradients():
    assert min_norm_gamma(1.0, 2.0, 5.0) == 0.999  # <x1,x2> >= ||x1||^2
    assert min_norm_gamma(5.0, 2.0, 1.0) == 0.001  # <x1,x2> >= ||x2||^2
    assert min_norm_gamma(1.0, -1.0, 5.0) == pytest.approx(6 / 8)
    # no unimodal gradient (the modality's rows are all missing): cosine 0, gamma 0.001
    g_mm = torch.tensor([1.0, -2.0])
    k_mm, k_uni, cos = pareto_weights(g_mm, torch.zeros(2))
    assert cos == 0.0 and k_mm == 0.001
    new = integrate(g_mm, g_mm, torch.zeros(2), k_mm, k_uni, ALPHA)
    torch.testing.assert_close(new, ALPHA * g_mm)  # rescaled to the sum's length
    # exactly opposite gradients of equal length: the min-norm point is 0 (the official
    # ratio would be inf * 0 = nan); the gradient is zero
    k_mm, k_uni, _ = pareto_weights(g_mm, -g_mm)
    assert k_mm == pytest.approx(0.5)
    new = integrate(torch.zeros(2), g_mm, -g_mm, k_mm, k_uni, ALPHA)
    assert torch.equal(new, torch.zeros(2))


# ---------------------------------------------------------------------------- a real step
def setup_strategy(extra=(), modalities: int = 3):
    signal = "[3.0, 1.5, 0.4]" if modalities == 3 else "[3.0, 0.8]"
    data_opts = (
        f"dataset.options={{num_samples: 600, num_classes: 4, "
        f"num_modalities: {modalities}, signal: {signal}}}"
    )
    config = build_config(
        {}, [*small_overrides("mmpareto"), data_opts, "model.encoder.dropout=0.3", *extra]
    )
    data = load_dataset(config.dataset.name, seed=0, **config.dataset.options)
    torch.manual_seed(0)
    model = build_model(config, data.info)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: grads are kept, no move
    strategy = build_strategy(config.strategy)
    strategy.setup(TrainContext(model, optimizer, data.modalities, data.num_classes, seed=0))
    return data, model, strategy


def official_step(model, batch, seed):
    """``train_epoch`` of ``code/MMPareto.py`` for any number of modalities: each loss
    backward in turn (gradients zeroed between), the summed loss backward, then the
    encoder gradients replaced tensor by tensor."""
    names = model.modalities
    torch.manual_seed(seed)
    out = model(batch, with_unimodal=True)
    losses = {"both": F.cross_entropy(out.logits, batch.labels)}
    losses.update({m: F.cross_entropy(out.unimodal_logits[m], batch.labels) for m in names})
    record = {m: model.modality_parameters(m) for m in names}
    grads = {m: {} for m in names}
    for kind, loss in losses.items():
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        for m in names:
            if kind in ("both", m):
                grads[m][kind] = [p.grad.clone() for p in record[m]]
    model.zero_grad(set_to_none=True)
    weights, coses = {}, {}
    for m in names:
        a = torch.cat([g.flatten() for g in grads[m]["both"]])
        b = torch.cat([g.flatten() for g in grads[m][m]])
        coses[m] = float(F.cosine_similarity(a, b, dim=0))
        if coses[m] > 0:
            weights[m] = (0.5, 0.5)
        else:
            v11, v12, v22 = float(a @ a), float(a @ b), float(b @ b)
            if v12 >= v11:
                c = 0.999
            elif v12 >= v22:
                c = 0.001
            else:
                c = -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))
            weights[m] = (c, 1 - c)
    sum(losses.values()).backward()
    expected = {}
    for m in names:
        k0, k1 = weights[m]
        new_grads = []
        for p, g_both, g_m in zip(record[m], grads[m]["both"], grads[m][m], strict=True):
            three_norm = torch.norm(p.grad)
            new_grad = 2 * k0 * g_both + 2 * k1 * g_m
            diff = three_norm / torch.norm(new_grad)
            new_grads.append(diff * new_grad * ALPHA if diff > 1 else new_grad * ALPHA)
        expected[m] = new_grads
    head = [p.grad.clone() for p in model.head_parameters()]
    model.zero_grad(set_to_none=True)
    return expected, head, weights, coses


def test_encoder_gradients_after_a_real_step_are_the_official_combination():
    """Three modalities, dropout on; the head draws are searched (deterministically) for
    a batch where one modality's gradients conflict and another's agree."""
    data, model, strategy = setup_strategy()
    names = model.modalities
    batch = next(data.train.batches(4))
    for draw in range(60):
        torch.manual_seed(1000 + draw)
        with torch.no_grad():
            model.head_weight().normal_(0.0, 3.0)
        expected, head, weights, coses = official_step(model, batch, seed=draw)
        if min(coses.values()) <= 0 < max(coses.values()):
            break
    else:
        pytest.fail("no batch with both a conflict and an agreement")
    torch.manual_seed(draw)  # the same dropout masks as the hand step
    logs = strategy.training_step(batch)
    for m in names:
        assert logs[f"cos_{m}"] == pytest.approx(coses[m], abs=1e-5)
        assert logs[f"k_mm_{m}"] == pytest.approx(weights[m][0], rel=1e-4)
        for p, g in zip(model.modality_parameters(m), expected[m], strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    # the classifier keeps the plain gradient of the summed losses
    for p, g in zip(model.head_parameters(), head, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    conflicted = [m for m in names if coses[m] <= 0]
    assert all(0 < weights[m][0] < 1 and weights[m][0] != 0.5 for m in conflicted)


@pytest.mark.parametrize("fusion", ["late", "sum"])
def test_two_modalities_and_other_fusions_follow_the_official_step(fusion):
    data, model, strategy = setup_strategy([f"model.fusion={fusion}"], modalities=2)
    batch = next(data.train.batches(32))
    expected, _, _, _ = official_step(model, batch, seed=3)
    torch.manual_seed(3)
    strategy.training_step(batch)
    for m in model.modalities:
        for p, g in zip(model.modality_parameters(m), expected[m], strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_missing_rows_and_a_wholly_absent_modality():
    data, model, strategy = setup_strategy()
    batch = next(data.train.batches(32))
    present = {m: p.clone() for m, p in batch.present.items()}
    present["m0"][::2] = False  # half the rows miss m0
    present["m2"][:] = False  # m2 is absent from the whole batch
    holed = MultimodalBatch(batch.inputs, present, batch.labels, batch.indices)
    logs = strategy.training_step(holed)
    assert all(math.isfinite(v) for v in logs.values())
    assert logs["loss_m2"] == 0.0
    for p in model.modality_parameters("m2"):
        assert p.grad is None or not bool(p.grad.any())
    assert any(bool(p.grad.any()) for p in model.modality_parameters("m0"))


def test_mmpareto_trains(small_config):
    config = small_config("mmpareto", epochs=4, extra=["model.encoder.dropout=0.3"])
    result = Trainer(config, progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.6  # chance is 0.25
    assert result.strategy.state_dict() == {}  # no state: resume is the loop's
