"""LFM (Yang et al., NeurIPS 2024; github.com/njustkmg/NeurIPS24-LFM, BalanceBenchmark
``balancemm/trainer/LFM_trainer.py``): the alignment, the loss and its weight recomputed by
hand, the hypergradient against finite differences, the schedules, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import equimodal.strategies.lfm  # noqa: F401
from equimodal.data.registry import load_dataset
from equimodal.engine.callbacks import Callback
from equimodal.engine.trainer import Trainer, build_model
from equimodal.strategies import TrainContext, build_strategy
from equimodal.strategies.lfm import (
    alignment,
    fitted_weights,
    hypergradient,
    learnable_step,
    probe_rows,
)

from .method_kit import method_config


def config_for(modalities: int = 3, epochs: int = 3, extra=()):
    return method_config("lfm", modalities, epochs, extra)


def setup_strategy(config, dtype=torch.float32):
    """Model, strategy and data; SGD with lr 0 leaves the parameters as they are."""
    data = load_dataset(config.dataset.name, seed=0, **config.dataset.options)
    torch.manual_seed(0)
    model = build_model(config, data.info).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    strategy = build_strategy(config.strategy)
    strategy.setup(TrainContext(model, optimizer, data.modalities, data.num_classes, seed=0))
    return data, model, strategy


def heads_by_hand(model, z):
    """Late fusion written out: each modality's own head ``W_m z_m + b_m``."""
    out = {}
    for m, x in z.items():
        weight, bias = sorted(model.head_parameters(m), key=lambda p: -p.ndim)
        out[m] = x @ weight.T + bias
    return out


def official_alignment(p, q):
    """``Alignment`` of the official code, written out: KL(m || p) and KL(m || q) per row."""
    p, q = torch.softmax(p, -1), torch.softmax(q, -1)
    m = 0.5 * p + 0.5 * q
    kl_mp = (m * (m.log() - p.log())).sum(-1)
    kl_mq = (m * (m.log() - q.log())).sum(-1)
    return 0.5 * (kl_mp.mean() + kl_mq.mean())


def test_alignment_by_hand():
    p = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    q = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
    # row 0 by hand
    sp, sq = torch.softmax(p[0], 0), torch.softmax(q[0], 0)
    mid = (sp + sq) / 2
    row0 = 0.5 * (sum(mid * torch.log(mid / sp)) + sum(mid * torch.log(mid / sq)))
    assert alignment(p[:1], q[:1]).item() == pytest.approx(row0.item(), rel=1e-6)
    assert alignment(p, q).item() == pytest.approx(official_alignment(p, q).item(), rel=1e-6)
    # the official direction KL(m || p), not Jensen-Shannon's KL(p || m)
    js = 0.5 * (F.kl_div(mid.log(), sp, reduction="sum") + F.kl_div(mid.log(), sq, reduction="sum"))
    assert abs(row0.item() - js.item()) > 1e-4
    assert alignment(p, p).item() == pytest.approx(0.0, abs=1e-7)


def test_loss_is_the_formula_by_hand_three_modalities_dropout_on():
    extra = ["model.encoder.dropout=0.3", "strategy.schedule=fitted"]
    data, model, strategy = setup_strategy(config_for(3, extra=extra))
    batch = next(data.train.batches(64))
    names = data.modalities
    strategy.on_epoch_start(31)
    model.train()
    torch.manual_seed(7)
    logs = strategy.training_step(batch)

    torch.manual_seed(7)
    with torch.no_grad():
        z = {m: model.encode_modality(m, batch.inputs[m]) for m in names}
        own = heads_by_hand(model, z)
        ce = F.cross_entropy(sum(own.values()) / 3, batch.labels)  # late fusion: the mean
        pairs = [("m0", "m1"), ("m0", "m2"), ("m1", "m2")]
        align = sum(official_alignment(own[a], own[b]) for a, b in pairs) / 3
    e = 30  # 0-based epoch of epoch 31
    a_cls = (
        2.04623704e-01
        + 3.35472727e-03 * e
        + 1.22989557e-04 * e**2
        - 2.92947416e-06 * e**3
        + 2.23835486e-08 * e**4
        - 5.39717505e-11 * e**5
    )
    assert logs["alpha_cls"] == pytest.approx(a_cls, rel=1e-9)
    assert logs["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert logs["align"] == pytest.approx(align.item(), rel=1e-5)
    expected = 2 * (a_cls * ce + (1 - a_cls) * align)
    assert logs["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_fitted_schedule():
    assert fitted_weights(1) == pytest.approx((0.204623704, 0.795376296))
    for epoch in (1, 21, 101, 200):
        a_cls, a_align = fitted_weights(epoch)
        assert a_cls + a_align == pytest.approx(1.0)
    assert fitted_weights(81)[0] == pytest.approx(0.5002197990976, rel=1e-9)
    assert fitted_weights(51)[0] > fitted_weights(21)[0] > fitted_weights(1)[0]
    # held at the official run's last epoch (0-based 199) afterwards
    assert fitted_weights(260) == fitted_weights(200)
    assert fitted_weights(200)[0] == pytest.approx(0.9159887524, rel=1e-8)


def test_learnable_schedule_switches():
    align, lr = 0.95, 1e-4
    steps = []
    for epoch in range(1, 46):
        align, lr = learnable_step(align, lr, epoch, gamma=10.0)
        steps.append(lr)
    # lr halves at 0-based epochs 20 and 40 (1-based 21 and 41), before that epoch's step
    assert steps[:20] == [1e-4] * 20
    assert steps[20:40] == [5e-5] * 20
    assert steps[40:] == [2.5e-5] * 5
    assert align == pytest.approx(0.95 - 10 * (20 * 1e-4 + 20 * 5e-5 + 5 * 2.5e-5))
    # clipped to [0.05, 0.95]
    assert learnable_step(0.5, 1.0, 1, gamma=100.0) == (0.05, 1.0)
    assert learnable_step(0.5, 1.0, 1, gamma=-100.0) == (0.95, 1.0)
    assert learnable_step(0.5, 1.0, 21, gamma=0.0, halve_every=0) == (0.5, 1.0)


def flat_grad(model, params, probe, a_cls, a_align, seed):
    """The gradient of ``a_cls CE + a_align A`` on ``probe``, dropout drawn after ``seed``."""
    from equimodal.strategies.lfm import lfm_losses

    torch.manual_seed(seed)
    ce, align = lfm_losses(model, model.encode(probe), probe)
    grads = torch.autograd.grad(a_cls * ce + a_align * align, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def test_hypergradient_is_the_hessian_vector_product_by_finite_differences():
    extra = ["model.encoder.dropout=0.3", "model.fusion=concat"]
    data, model, strategy = setup_strategy(config_for(2, extra=extra), dtype=torch.float64)
    batch = next(data.train.batches(64))
    batch.inputs = {m: x.double() for m, x in batch.inputs.items()}
    probe = probe_rows(batch, 0.25)
    assert len(probe) == 16
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    a_cls, a_align = 0.3, 0.7
    g_cls = flat_grad(model, params, probe, 1.0, 0.0, seed=3)  # the vector: CE's gradient
    eps = 1e-5
    with torch.no_grad():
        for p, v in zip(params, g_cls, strict=True):
            p.add_(eps * v)
    plus = flat_grad(model, params, probe, a_cls, a_align, seed=3)
    with torch.no_grad():
        for p, v in zip(params, g_cls, strict=True):
            p.sub_(2 * eps * v)
    minus = flat_grad(model, params, probe, a_cls, a_align, seed=3)
    with torch.no_grad():
        for p, v in zip(params, g_cls, strict=True):
            p.add_(eps * v)
    hvp = [(a - b) / (2 * eps) for a, b in zip(plus, minus, strict=True)]
    torch.manual_seed(3)
    first = hypergradient(model, probe, a_cls, a_align, "first")
    torch.manual_seed(3)
    every = hypergradient(model, probe, a_cls, a_align, "all")
    assert abs(hvp[0].mean().item()) > 1e-6  # not trivially zero
    assert first == pytest.approx(hvp[0].mean().item(), rel=1e-5)
    assert every == pytest.approx(torch.cat([h.reshape(-1) for h in hvp]).mean().item(), rel=1e-5)


def test_learnable_update_once_per_epoch_on_the_probe_rows():
    data, model, strategy = setup_strategy(config_for(3, extra=["model.encoder.dropout=0.3"]))
    batches = data.train.batches(64)
    first, second = next(batches), next(batches)
    model.train()
    strategy.on_epoch_start(1)
    torch.manual_seed(11)
    gamma = hypergradient(model, probe_rows(first, 0.25), 0.05, 0.95)
    torch.manual_seed(11)
    logs = strategy.training_step(first)
    assert strategy.gamma == pytest.approx(gamma, rel=1e-6)
    assert strategy.align == pytest.approx(0.95 - 1e-4 * gamma, rel=1e-12)
    assert logs["alpha_cls"] == pytest.approx(1 - strategy.align)
    align = strategy.align
    strategy.training_step(second)  # no second update within the epoch
    assert strategy.align == align
    strategy.on_epoch_start(2)
    strategy.training_step(second)
    assert strategy.updated_epoch == 2 and strategy.align != align
    log = strategy.epoch_log()
    assert set(log) == {"alpha_cls", "alpha_grad", "lr_alpha"}
    # state: JSON, and loading it continues with the same weight
    state = json.loads(json.dumps(strategy.state_dict()))
    fresh = build_strategy(strategy.config)
    fresh.setup(strategy.context)
    fresh.load_state_dict(state)
    fresh.on_epoch_start(2)
    assert fresh.weights() == strategy.weights() and fresh.updated_epoch == 2


def test_one_modality_is_refused():
    config = config_for(3)
    data, model, _ = setup_strategy(config)
    strategy = build_strategy(config.strategy)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="needs 2 or more"):
        strategy.setup(TrainContext(model, opt, ("m0",), 4, seed=0))


class StopAt(Callback):
    """Raises at the first batch of ``epoch`` (the checkpoint of the epoch before stays)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_batch_end(self, trainer, state, logs) -> None:
        if state.epoch == self.epoch:
            raise RuntimeError("stopped")


def history(trainer):
    drop = {"train_time_s", "eval_time_s"}
    return [{k: v for k, v in row.items() if k not in drop} for row in trainer.state.history]


def test_resume_continues_exactly(tmp_path):
    # a large step size with halving every 2 epochs: the weight moves and its schedule spans
    # the cut, so a lost or wrong strategy state changes the history
    extra = [
        "model.encoder.dropout=0.2",
        "train.patience=null",
        "strategy.lr_alpha=20.0",
        "strategy.lr_halve_every=2",
    ]
    config = config_for(3, epochs=3, extra=extra)
    ref = Trainer(config, run_dir=tmp_path / "ref", progress=False)
    ref.fit()
    stopped = Trainer(config, run_dir=tmp_path / "cut", progress=False, callbacks=[StopAt(2)])
    with pytest.raises(RuntimeError, match="stopped"):
        stopped.fit()
    resumed = Trainer(config, run_dir=tmp_path / "cut", progress=False, resume=True)
    resumed.fit()
    assert history(resumed) == history(ref)
    weights = [row["alpha_cls"] for row in history(ref)]
    assert len(set(weights)) == len(weights)  # the weight moved every epoch
    assert resumed.strategy.state_dict() == ref.strategy.state_dict()


@pytest.mark.parametrize(
    "extra", [[], ["strategy.schedule=fitted", "train.missing_rate=0.3", "model.fusion=concat"]]
)
def test_lfm_trains(extra):
    config = config_for(3, epochs=4, extra=["model.encoder.dropout=0.3", *extra])
    result = Trainer(config, progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.6  # chance: 0.25
