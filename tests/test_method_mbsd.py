"""MBSD as BalanceBenchmark implements it (``balancemm/trainer/MBSD_trainer.py``): the
loss recomputed by hand with the official per-row loops, dropout on, two and three
modalities, rows missing a modality, the modulation window, and a short run that learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import equimodal.strategies.mbsd  # noqa: F401
from equimodal.data.batch import MultimodalBatch
from equimodal.engine.trainer import Trainer

from .method_kit import first_batches, method_config
from .method_kit import set_up as setup


def config_for(modalities: int, epochs: int = 3, extra=()):
    return method_config("mbsd", modalities, epochs, extra)


def batches(data, count: int) -> list[MultimodalBatch]:
    return first_batches(data, count, size=48)


def official_pair_terms(u_a, u_b, label, on_logits: bool):
    """``w . KL / B`` and ``w . RS / B`` of one pair, as the official loops build them."""
    softmax = torch.nn.Softmax(dim=1)
    pa, pb = softmax(u_a), softmax(u_b)
    ya, yb = pa.argmax(-1), pb.argmax(-1)
    n = len(label)
    w, ps, pw = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    for i in range(n):
        if ya[i] == label[i] or yb[i] == label[i]:
            w[i] = max(pa[i][label[i]], pb[i][label[i]]) - min(pa[i][label[i]], pb[i][label[i]])
        ps[i] = max(pa[i][label[i]], pb[i][label[i]])
        pw[i] = min(pa[i][label[i]], pb[i][label[i]])
    diff = u_a - u_b if on_logits else pa - pb
    rs = 1 / u_a.shape[1] * torch.sum(diff**2, dim=1)
    kl = F.kl_div(ps, pw, reduction="none")
    return torch.mm(w.reshape(1, -1), kl.reshape(-1, 1)).squeeze() / n, torch.mm(
        w.reshape(1, -1), rs.reshape(-1, 1)
    ).squeeze() / n


def official_loss(model, batch, seed: int):
    """``CE(out) + sum_m CE(u_m) + KL + RS`` of ``MBSDTrainer.training_step`` (logits in RS
    for two modalities, probabilities and the mean of the three pairs for three); a pair's
    terms over the rows where both modalities are present (all rows on complete data)."""
    torch.manual_seed(seed)
    model.train()
    out = model(batch, with_unimodal=True)
    u, label, names = out.unimodal_logits, batch.labels, model.modalities
    any_row = torch.stack([batch.present[m] for m in names]).any(0)
    total = F.cross_entropy(out.logits[any_row], label[any_row])
    for m in names:
        rows = batch.present[m]
        total = total + F.cross_entropy(u[m][rows], label[rows])
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    kl_sum, rs_sum = 0.0, 0.0
    for a, b in pairs:
        both = batch.present[a] & batch.present[b]
        kl, rs = official_pair_terms(u[a][both], u[b][both], label[both], len(names) == 2)
        kl_sum, rs_sum = kl_sum + kl, rs_sum + rs
    return total + kl_sum / len(pairs) + rs_sum / len(pairs)


def grads_of(loss, model):
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def assert_step_matches(model, strategy, batch, seed):
    expected_loss = official_loss(model, batch, seed)
    expected = grads_of(expected_loss, model)
    torch.manual_seed(seed)
    logs = strategy.training_step(batch)
    assert logs["loss"] == pytest.approx(float(expected_loss.detach()), rel=1e-5, abs=1e-6)
    for p, g in zip(model.parameters(), expected, strict=True):
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, g, atol=1e-6, rtol=1e-4)
    return logs


@pytest.mark.parametrize("modalities", [2, 3])
def test_loss_and_gradients_are_the_official_ones_with_dropout_on(modalities):
    config = config_for(modalities, extra=["model.encoder.dropout=0.3"])
    data, model, strategy = setup(config)
    for t, batch in enumerate(batches(data, 2)):
        logs = assert_step_matches(model, strategy, batch, seed=100 + t)
        assert logs["kl"] != 0.0 and logs["rs"] > 0.0 and 0.0 < logs["weight"] < 1.0


def test_the_pair_terms_by_hand_on_small_tensors():
    """``w = |p_a(y) - p_b(y)|`` only where one modality is right; ``KL = p_w (log p_w - p_s)``;
    ``RS = mean_c (u_a - u_b)^2``."""
    from equimodal.strategies.mbsd import pair_terms

    u_a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    u_b = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([0, 0, 1])  # row 0: a right; row 1: both wrong; row 2: both wrong
    w, kl, rs = pair_terms(u_a, u_b, y, on_logits=True)
    pa, pb = torch.softmax(u_a, 1)[torch.arange(3), y], torch.softmax(u_b, 1)[torch.arange(3), y]
    s, weak = torch.maximum(pa, pb), torch.minimum(pa, pb)
    torch.testing.assert_close(
        w, torch.stack([s[0] - weak[0], torch.tensor(0.0), torch.tensor(0.0)])
    )
    torch.testing.assert_close(kl, weak * (weak.log() - s))
    torch.testing.assert_close(rs, ((u_a - u_b) ** 2).mean(1))
    _, _, rs_p = pair_terms(u_a, u_b, y, on_logits=False)
    torch.testing.assert_close(rs_p, ((u_a.softmax(1) - u_b.softmax(1)) ** 2).mean(1))


def test_rows_missing_a_modality_leave_its_terms():
    config = config_for(3, extra=["model.encoder.dropout=0.3"])
    data, model, strategy = setup(config)
    batch = batches(data, 1)[0]
    present = {m: p.clone() for m, p in batch.present.items()}
    present["m1"][::3] = False
    present["m2"][1::4] = False
    batch = MultimodalBatch(batch.inputs, present, batch.labels, batch.indices)
    assert_step_matches(model, strategy, batch, seed=7)


def test_outside_the_window_only_the_fused_cross_entropy():
    config = config_for(2, extra=["strategy.modulation_end=3"])
    data, model, strategy = setup(config)
    batch = batches(data, 1)[0]
    strategy.on_epoch_start(4)
    model.train()
    torch.manual_seed(3)
    expected = grads_of(F.cross_entropy(model(batch).logits, batch.labels), model)
    torch.manual_seed(3)
    logs = strategy.training_step(batch)
    assert set(logs) == {"ce", "loss"}
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(torch.zeros_like(p) if p.grad is None else p.grad, g)


@pytest.mark.parametrize("modalities", [2, 3])
def test_short_training_run_learns(modalities):
    config = config_for(modalities, extra=["model.encoder.dropout=0.3"])
    result = Trainer(config, progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.7  # 4 classes: chance is 0.25
    assert len(result.history) == 4


def test_late_fusion_and_missing_rate_train():
    extra = ["model.fusion=late", "train.missing_rate=0.3"]
    result = Trainer(config_for(3, epochs=2, extra=extra), progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.5
