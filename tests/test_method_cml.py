"""CML (Ma et al., ICML 2023; BalanceBenchmark ``balancemm/trainer/CML_trainer.py``): the loss
recomputed by hand on a tiny model, the hinge's values and gradients, the removal order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import equimodal.strategies.cml  # noqa: F401
from equimodal.data.batch import MultimodalBatch
from equimodal.engine.trainer import Trainer
from equimodal.strategies import TrainContext, build_strategy
from equimodal.strategies.cml import (
    CMLConfig,
    cml_losses,
    confidence_penalty,
    nested_subsets,
    removal_order,
)

from .method_kit import method_config
from .method_kit import set_up as setup_strategy


def config_for(modalities: int = 3, epochs: int = 3, extra=()):
    return method_config("cml", modalities, epochs, extra)


def concat_logits_by_hand(model, z, kept):
    """BalanceBenchmark's concat head with the removed blocks dropped: sum of ``W_m z_m`` over
    the kept modalities, plus the bias."""
    blocks = model.decision_weights()
    bias = next(p for p in model.head_parameters() if p.ndim == 1)
    return sum(z[m] @ blocks[m].T for m in kept) + bias


@pytest.mark.parametrize("remove_by", ["absent", "zeros"])
def test_cml_loss_is_the_formula_by_hand_three_modalities_dropout_on(remove_by):
    config = config_for(
        3,
        extra=[
            "model.fusion=concat",
            "model.encoder.dropout=0.3",
            f"strategy.remove_by={remove_by}",
        ],
    )
    data, model, strategy = setup_strategy(config)
    batch = next(data.train.batches(64))
    names = data.modalities
    strategy.on_epoch_start(2)
    order = strategy.order()
    assert sorted(order) == sorted(names)
    model.train()
    torch.manual_seed(5)
    logs = strategy.training_step(batch)

    torch.manual_seed(5)  # the same dropout draws, in the same (dataset) order
    z = {m: model.encode_modality(m, batch.inputs[m]) for m in names}
    kept = [list(names)]
    for removed in order[:2]:
        kept.append([m for m in kept[-1] if m != removed])
    logits = [concat_logits_by_hand(model, z, s) for s in kept]
    # BalanceBenchmark's removal: out_p = out_s - unimodal[removed] + bias / M
    uni = model.unimodal_logits(z)
    bias = next(p for p in model.head_parameters() if p.ndim == 1)
    torch.testing.assert_close(logits[1], logits[0] - uni[order[0]] + bias / 3)
    torch.testing.assert_close(logits[2], logits[1] - uni[order[1]] + bias / 3)

    with torch.no_grad():
        ce = sum(F.cross_entropy(lg, batch.labels) for lg in logits) / 3
        conf = [torch.softmax(lg, 1).max(1).values for lg in logits]
        reg = torch.relu(conf[1] - conf[0]).sum() + torch.relu(conf[2] - conf[1]).sum()
    assert reg > 0  # the check means something: some confidence rises on removal
    assert logs["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert logs["cml"] == pytest.approx(float(reg), rel=1e-5)
    assert logs["loss"] == pytest.approx(float(ce + 0.1 * reg), rel=1e-5)


def test_hinge_values_and_gradients_by_hand():
    more = torch.tensor([0.9, 0.6, 0.5, 0.7], requires_grad=True)
    less = torch.tensor([0.4, 0.8, 0.5, 0.75], requires_grad=True)
    rows = torch.ones(4, dtype=torch.bool)
    # per sample: only the rows whose confidence rises with a modality removed
    p = confidence_penalty(less, more, rows)
    assert p.item() == pytest.approx(0.2 + 0.05)
    p.backward()
    assert less.grad.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert more.grad.tolist() == [0.0, -1.0, 0.0, -1.0]
    assert confidence_penalty(less, more, rows, reduction="mean").item() == pytest.approx(0.25 / 4)
    # the authors' cpm exemption: row 1 excused
    exempt = torch.tensor([False, True, False, False])
    assert confidence_penalty(less, more, rows, exempt=exempt).item() == pytest.approx(0.05)
    # rows outside the mask do not count
    assert confidence_penalty(less, more, torch.tensor([1, 0, 1, 0]).bool()).item() == 0.0
    # BalanceBenchmark's conf_loss: the hinge of the batch sum (-0.5 + 0.2 + 0 + 0.05 < 0)
    less.grad, more.grad = None, None
    b = confidence_penalty(less, more, rows, penalty="batch")
    b.backward()
    assert b.item() == 0.0 and not less.grad.any() and not more.grad.any()
    # once the sum is positive, every row gets a gradient (also those that did not rise)
    less2 = torch.tensor([0.95, 0.8, 0.5, 0.75], requires_grad=True)
    b2 = confidence_penalty(less2, more.detach(), rows, penalty="batch")
    b2.backward()
    assert b2.item() == pytest.approx(0.05 + 0.2 + 0.0 + 0.05)
    assert less2.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_regulariser_is_zero_when_the_full_confidence_dominates():
    more = torch.tensor([0.9, 0.8, 0.7], requires_grad=True)
    less = torch.tensor([0.5, 0.8, 0.3], requires_grad=True)
    rows = torch.ones(3, dtype=torch.bool)
    for penalty in ("sample", "batch"):
        p = confidence_penalty(less, more, rows, penalty=penalty)
        p.backward()
        assert p.item() == 0.0
        assert not less.grad.any() and not more.grad.any()
        less.grad, more.grad = None, None


def test_gradient_reaches_only_the_rows_that_violate():
    config = config_for(3, extra=["model.encoder.dropout=0.3"])
    data, model, strategy = setup_strategy(config)
    batch = next(data.train.batches(64))
    names = data.modalities
    order = ("m1", "m0", "m2")
    z = {m: model.encode_modality(m, batch.inputs[m]).detach().requires_grad_() for m in names}
    cfg = CMLConfig(subset_ce=False)
    _, reg = cml_losses(model, z, batch, order, cfg)
    reg.backward()
    # by hand: which rows see a confidence rise at either removal
    with torch.no_grad():
        subsets = nested_subsets(names, order)
        assert subsets == [("m0", "m1", "m2"), ("m0", "m2"), ("m2",)]
        conf = [
            torch.softmax(model.fuse(z, batch.present, modalities=list(s)).logits, 1).max(1).values
            for s in subsets
        ]
        violated = (conf[1] > conf[0]) | (conf[2] > conf[1])
        expected = torch.relu(conf[1] - conf[0]).sum() + torch.relu(conf[2] - conf[1]).sum()
    assert 0 < int(violated.sum()) < len(batch)  # both kinds of rows are there
    assert reg.item() == pytest.approx(expected.item(), rel=1e-6)
    grad_norm = sum(z[m].grad.abs().sum(1) for m in names)
    assert bool((grad_norm[~violated] == 0).all())
    assert bool((grad_norm[violated] > 0).all())


def test_batch_penalty_and_missing_rows_by_hand():
    config = config_for(3, extra=["model.encoder.dropout=0"])
    data, model, strategy = setup_strategy(config)
    full = next(data.train.batches(32))
    gen = torch.Generator().manual_seed(3)
    present = {m: torch.rand(32, generator=gen) > 0.3 for m in data.modalities}
    present["m0"] |= ~(present["m1"] | present["m2"])  # every row has some modality
    batch = MultimodalBatch(full.inputs, present, full.labels, full.indices)
    z = {m: model.encode_modality(m, batch.inputs[m]) for m in data.modalities}
    order = ("m2", "m0", "m1")
    subsets = [("m0", "m1", "m2"), ("m0", "m1"), ("m1",)]
    logits = [model.fuse(z, present, modalities=list(s)).logits for s in subsets]
    conf = [torch.softmax(lg, 1).max(1).values for lg in logits]

    def any_of(s):
        return torch.stack([present[m] for m in s]).any(0)

    ce = (
        sum(
            F.cross_entropy(lg[any_of(s)], batch.labels[any_of(s)])
            for lg, s in zip(logits, subsets, strict=True)
        )
        / 3
    )
    rows = [present["m2"] & any_of(subsets[1]), present["m0"] & any_of(subsets[2])]
    diffs = [(conf[k + 1] - conf[k])[rows[k]] for k in range(2)]
    for penalty, reg in [
        ("sample", sum(torch.relu(d).sum() for d in diffs)),
        ("batch", sum(torch.relu(d.sum()) for d in diffs)),
    ]:
        got_ce, got_reg = cml_losses(model, z, batch, order, CMLConfig(penalty=penalty))
        assert got_ce.item() == pytest.approx(ce.item(), rel=1e-6)
        assert got_reg.item() == pytest.approx(reg.item(), rel=1e-6, abs=1e-7)


def test_removal_order_per_epoch():
    names = ("a", "b", "c")
    orders = {removal_order(names, seed=0, epoch=e) for e in range(1, 30)}
    assert all(sorted(o) == list(names) for o in orders)
    assert len(orders) > 1  # a new draw each epoch
    assert removal_order(names, 0, 4) == removal_order(names, 0, 4)  # resume draws the same
    assert removal_order(names, 0, 4, shuffle=False) == ("c", "b", "a")
    assert nested_subsets(("a", "b"), ("b", "a")) == [("a", "b"), ("a",)]


def test_outside_its_epochs_cml_is_joint_training():
    config = config_for(3, extra=["strategy.modulation_end=0", "model.encoder.dropout=0"])
    data, model, strategy = setup_strategy(config)
    batch = next(data.train.batches(64))
    strategy.on_epoch_start(1)
    logs = strategy.training_step(batch)
    assert set(logs) == {"loss"}
    assert logs["loss"] == pytest.approx(
        float(F.cross_entropy(model(batch).logits, batch.labels).detach())
    )


def test_one_modality_is_refused():
    config = config_for(3)
    data, model, _ = setup_strategy(config)
    strategy = build_strategy(config.strategy)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="needs 2 or more"):
        strategy.setup(TrainContext(model, opt, ("m0",), 4, seed=0))


@pytest.mark.parametrize("extra", [[], ["train.missing_rate=0.3", "strategy.penalty=batch"]])
def test_cml_trains(extra):
    config = config_for(3, epochs=4, extra=["model.encoder.dropout=0.3", *extra])
    result = Trainer(config, progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.6  # chance: 0.25
