"""PMR (Fan et al., CVPR 2023): each rule recomputed by hand.

The paper's Eqs. 7-13 and the official code's ``train_epoch`` / ``calculate_prototype``
(github.com/fanyunfeng-bit/Modal-Imbalance-PMR, ``main_Prototype_grad.py``): prototypes are
class means of each modality's features with momentum, the prototypical softmax is over
negative Euclidean distances, the slow modality gets a clipped PCE weight and the dominant
one a clipped entropy weight (Eq. 11, Eq. 13).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import equimodal.strategies.pmr  # noqa: F401  (registers the strategy)
from equimodal.data.batch import MultimodalBatch
from equimodal.engine.trainer import Trainer
from equimodal.strategies.pmr import (
    pmr_coefficients,
    prototypical_cross_entropy,
    prototypical_entropy,
)

from .method_kit import first_batches as batches
from .method_kit import method_config
from .method_kit import set_up as setup_strategy


def config_for(modalities: int = 3, epochs: int = 3, extra=()):
    return method_config("pmr", modalities, epochs, extra)


def drop_rows(batch: MultimodalBatch, modality: str, rows: slice) -> MultimodalBatch:
    """The batch with ``modality`` missing in ``rows`` (inputs zeroed, present False)."""
    present = {m: p.clone() for m, p in batch.present.items()}
    inputs = {m: x.clone() for m, x in batch.inputs.items()}
    present[modality][rows] = False
    inputs[modality][rows] = 0.0
    return MultimodalBatch(inputs, present, batch.labels, batch.indices)


def eu_dist(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The official ``EU_dist``: an explicit loop of ``sqrt(dot(x - c, x - c))``."""
    return torch.stack([torch.stack([torch.sqrt(torch.dot(a - c, a - c)) for c in x2]) for a in x1])


def class_means(features: list[torch.Tensor], labels: list[torch.Tensor], classes: int):
    """Per-class means of the rows (float64), and which classes have rows."""
    z = torch.cat(features).double()
    y = torch.cat(labels)
    means = torch.zeros(classes, z.shape[1], dtype=torch.float64)
    seen = torch.zeros(classes, dtype=torch.bool)
    for k in range(classes):
        if bool((y == k).any()):
            means[k] = z[y == k].mean(0)
            seen[k] = True
    return means, seen


# ------------------------------------------------------------------ coefficients
def paper_eq11(s0: float, s1: float) -> tuple[float, float]:
    """Eq. 11 as printed: ``rho_t = s0 / s1``; ``(beta, gamma)`` weigh PCE_0 and PCE_1."""
    rho = s0 / s1
    if rho < 1:
        return min(max(1 / rho - 1, 0.0), 1.0), 0.0
    return 0.0, min(max(rho - 1, 0.0), 1.0)


@pytest.mark.parametrize("s0, s1", [(30.0, 20.0), (20.0, 30.0), (22.0, 20.0), (10.0, 40.0)])
def test_two_modality_coefficients_are_eq11_and_eq13(s0, s1):
    rho, beta, gamma = pmr_coefficients({"a": s0, "v": s1})
    b, g = paper_eq11(s0, s1)
    assert rho["a"] == pytest.approx(s0 / s1) and rho["v"] == pytest.approx(s1 / s0)
    # Eq. 10: alpha*beta on PCE_0, alpha*gamma on PCE_1
    assert beta["a"] == pytest.approx(b) and beta["v"] == pytest.approx(g)
    # Eq. 13: -mu*gamma*H_0 - mu*beta*H_1 (each weight on the opposite modality)
    assert gamma["a"] == pytest.approx(g) and gamma["v"] == pytest.approx(b)


def test_coefficients_on_hand_made_scores():
    rho, beta, gamma = pmr_coefficients({"a": 30.0, "v": 20.0})
    assert (beta, gamma) == ({"a": 0.0, "v": pytest.approx(0.5)}, {"a": 0.5, "v": 0.0})
    _, beta, gamma = pmr_coefficients({"a": 10.0, "v": 40.0})  # clipped at 1
    assert (beta, gamma) == ({"a": 1.0, "v": 0.0}, {"a": 0.0, "v": 1.0})
    _, beta, gamma = pmr_coefficients({"a": 5.0, "v": 5.0})  # balanced: nothing
    assert (beta, gamma) == ({"a": 0.0, "v": 0.0}, {"a": 0.0, "v": 0.0})
    # the released code's rule: weight 1 for the slower modality, whatever the gap
    _, beta, gamma = pmr_coefficients({"a": 22.0, "v": 20.0}, "binary")
    assert (beta, gamma) == ({"a": 0.0, "v": 1.0}, {"a": 1.0, "v": 0.0})
    # ours, three modalities: rho_m against the mean of the others
    rho, beta, gamma = pmr_coefficients({"a": 1.2, "b": 1.0, "c": 0.8})
    assert rho == pytest.approx({"a": 1.2 / 0.9, "b": 1.0, "c": 0.8 / 1.1})
    assert beta == pytest.approx({"a": 0.0, "b": 0.0, "c": 1.1 / 0.8 - 1})
    assert gamma == pytest.approx({"a": 1.2 / 0.9 - 1, "b": 0.0, "c": 0.0})


# ------------------------------------------------------------------ the losses
def test_pce_pulls_each_feature_toward_its_class_prototype():
    g = torch.Generator().manual_seed(3)
    prototypes = torch.randn(4, 6, generator=g, dtype=torch.float64)
    z = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (10,), generator=g)
    loss = prototypical_cross_entropy(z, prototypes, labels)
    # Eq. 9 with the official distance
    logits = -eu_dist(z, prototypes)
    want = -torch.log(torch.softmax(logits, 1)[torch.arange(10), labels]).mean()
    torch.testing.assert_close(loss, want)
    (grad,) = torch.autograd.grad(loss, z)
    stepped = z.detach() - 0.01 * grad
    before = (z.detach() - prototypes[labels]).norm(dim=1)
    after = (stepped - prototypes[labels]).norm(dim=1)
    assert bool((after < before).all())  # every row moves toward its own prototype
    # and the loss falls
    assert float(prototypical_cross_entropy(stepped, prototypes, labels)) < float(loss.detach())


def test_entropy_regularisation_flattens_the_prototypical_distribution():
    g = torch.Generator().manual_seed(4)
    prototypes = torch.randn(5, 3, generator=g, dtype=torch.float64)
    z = torch.randn(8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    h = prototypical_entropy(z, prototypes)
    p = torch.softmax(-eu_dist(z, prototypes), 1)
    torch.testing.assert_close(h, -(p * p.log()).sum(1).mean())
    (grad,) = torch.autograd.grad(-0.01 * h, z)  # the term -mu * gamma * H of Eq. 13
    assert float(prototypical_entropy(z.detach() - 0.5 * grad, prototypes)) > float(h.detach())


# ------------------------------------------------------------------ prototypes
def test_prototypes_are_class_means_with_momentum_and_skip_missing_rows():
    config = config_for(3, extra=["model.encoder.dropout=0", "strategy.momentum=0.2"])
    data, model, strategy = setup_strategy(config)  # lr 0: features recomputable
    names = model.modalities
    epoch1 = [drop_rows(b, "m1", slice(0, 20)) for b in batches(data, 3)]
    epoch2 = batches(data, 2, start=3)
    strategy.on_epoch_start(1)
    for i, batch in enumerate(epoch1):
        strategy.training_step(batch)
        if i == 0:  # epoch 1: the running class means of the rows seen so far
            z = model(batch).features
            for m in names:
                rows = batch.present[m]
                means, seen = class_means([z[m][rows].detach()], [batch.labels[rows]], 4)
                got, mask = strategy.current_prototypes(m)
                assert torch.equal(mask, seen)
                torch.testing.assert_close(got[seen], means[seen])
    feats = {m: ([], []) for m in names}
    for batch in epoch1:
        z = model(batch).features
        for m in names:
            rows = batch.present[m]
            feats[m][0].append(z[m][rows].detach())
            feats[m][1].append(batch.labels[rows])
    strategy.on_epoch_start(2)
    first = {}
    for m in names:
        means, seen = class_means(*feats[m], 4)
        assert bool(seen.all())
        first[m] = means
        torch.testing.assert_close(strategy.prototypes[m], means, atol=1e-7, rtol=1e-6)
        assert strategy.counts[m].sum() == 0  # the next epoch's sums start anew
    # m1's prototypes used only its present rows: with the dropped rows they differ
    z_all = [model(b).features["m1"].detach() for b in epoch1]
    with_dropped, _ = class_means(z_all, [b.labels for b in epoch1], 4)
    assert (with_dropped - first["m1"]).abs().max() > 1e-4
    for batch in epoch2:
        strategy.training_step(batch)
    strategy.on_epoch_start(3)
    for m in names:
        zs = [model(b).features[m].detach() for b in epoch2]
        new, _ = class_means(zs, [b.labels for b in epoch2], 4)
        torch.testing.assert_close(
            strategy.prototypes[m], 0.2 * first[m] + 0.8 * new, atol=1e-7, rtol=1e-6
        )


# ------------------------------------------------------------------ the training step
def step_by_hand(model, batch, prototypes, alpha, mu, regularise, seed):
    """Eqs. 7-13 written out with the official distance; returns the gradients, the
    coefficients and the scores."""
    names = model.modalities
    torch.manual_seed(seed)
    model.train()
    out = model(batch)
    loss = F.cross_entropy(out.logits, batch.labels)
    probs, scores = {}, {}
    for m in names:
        logits = -eu_dist(out.features[m], prototypes[m].float())
        probs[m] = torch.softmax(logits, 1)
        true = probs[m][torch.arange(len(batch)), batch.labels]
        scores[m] = float(true.detach().sum())  # the official sum over the batch
    if len(names) == 2:  # the paper's own two-modality form
        beta, gamma = paper_eq11(scores[names[0]], scores[names[1]])
        pce_w = {names[0]: beta, names[1]: gamma}
        ent_w = {names[0]: gamma, names[1]: beta}
    else:  # ours: rho_m against the mean of the others
        pce_w, ent_w = {}, {}
        for m in names:
            others = [scores[k] for k in names if k != m]
            rho = scores[m] / (sum(others) / len(others))
            pce_w[m] = min(1 / rho - 1, 1.0) if rho < 1 else 0.0
            ent_w[m] = min(rho - 1, 1.0) if rho > 1 else 0.0
    for m in names:
        p = probs[m]
        pce = -torch.log(p[torch.arange(len(batch)), batch.labels]).mean()
        entropy = -(p * p.log()).sum(1).mean()
        loss = loss + alpha * pce_w[m] * pce
        if regularise:
            loss = loss - mu * ent_w[m] * entropy
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads, pce_w, ent_w, float(loss.detach())


@pytest.mark.parametrize("modalities", [2, 3])
@pytest.mark.parametrize("entropy_epochs", [10, 1])
def test_training_step_is_the_paper_loss_with_dropout_on(modalities, entropy_epochs):
    extra = ["model.encoder.dropout=0.3", f"strategy.entropy_epochs={entropy_epochs}"]
    config = config_for(modalities, extra=extra)
    data, model, strategy = setup_strategy(config)  # lr 0: the parameters stay
    names = model.modalities
    epoch1, later = batches(data, 2, size=32), batches(data, 2, start=2, size=32)
    strategy.on_epoch_start(1)
    feats = {m: ([], []) for m in names}
    for t, batch in enumerate(epoch1):
        torch.manual_seed(500 + t)
        strategy.training_step(batch)
        torch.manual_seed(500 + t)  # the same dropout draw: the features it accumulated
        z = model(batch).features
        for m in names:
            feats[m][0].append(z[m].detach())
            feats[m][1].append(batch.labels)
    prototypes = {m: class_means(*feats[m], 4)[0] for m in names}
    strategy.on_epoch_start(2)
    cfg = config.strategy
    exercised = False
    for t, batch in enumerate(later):
        grads, pce_w, ent_w, loss = step_by_hand(
            model, batch, prototypes, cfg.alpha, cfg.mu, entropy_epochs >= 2, seed=600 + t
        )
        torch.manual_seed(600 + t)
        logs = strategy.training_step(batch)
        assert logs["loss"] == pytest.approx(loss, rel=1e-5)
        for m in names:
            assert logs[f"beta_{m}"] == pytest.approx(pce_w[m], rel=1e-4, abs=1e-6)
            want_gamma = ent_w[m] if entropy_epochs >= 2 else 0.0
            assert logs[f"gamma_{m}"] == pytest.approx(want_gamma, rel=1e-4, abs=1e-6)
        exercised |= any(v > 0 for v in pce_w.values()) and any(v > 0 for v in ent_w.values())
        for name, p in model.named_parameters():
            if name in grads:
                torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-4)
            else:
                assert p.grad is None, name
    assert exercised  # a slow and a dominant modality: both terms were in the loss


def test_outside_the_window_it_is_joint_training():
    config = config_for(2, extra=["strategy.modulation_end=1"])
    data, model, strategy = setup_strategy(config)
    batch = batches(data, 1)[0]
    strategy.on_epoch_start(1)
    assert "beta_m0" in strategy.training_step(batch)
    strategy.on_epoch_start(2)
    assert set(strategy.training_step(batch)) == {"loss", "loss_ce"}


def test_state_is_json_and_resumes_exactly():
    config = config_for(3, extra=["model.encoder.dropout=0"])
    data, model, strategy = setup_strategy(config)
    strategy.on_epoch_start(1)
    for batch in batches(data, 2):
        strategy.training_step(batch)
    strategy.on_epoch_start(2)
    strategy.training_step(batches(data, 1, start=2)[0])  # mid-epoch: sums are state too
    state = json.loads(json.dumps(strategy.state_dict()))
    _, _, twin = setup_strategy(config)  # the same initial model (lr 0: it never moves)
    twin.load_state_dict(state)
    for s in (strategy, twin):
        s.on_epoch_start(3)
    for m in model.modalities:
        assert torch.equal(twin.prototypes[m], strategy.prototypes[m])
        assert torch.equal(twin.known[m], strategy.known[m])
    for batch in batches(data, 2, start=3):
        assert twin.training_step(batch) == strategy.training_step(batch)


def test_pmr_trains_on_three_modalities_and_with_missing_rows(small_config):
    result = Trainer(small_config("pmr", epochs=4), progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.8
    train = result.history[-1]["train"]
    assert any(train[f"beta_{m}"] > 0 for m in ("m0", "m1", "m2"))  # a slow modality helped
    missing = small_config("pmr", epochs=3, extra=["train.missing_rate=0.3"])
    result = Trainer(missing, progress=False).fit()
    assert all(math.isfinite(v) for v in result.history[-1]["train"].values())
    assert result.metrics["test"]["accuracy"] > 0.6
