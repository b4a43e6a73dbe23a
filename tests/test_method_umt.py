"""UMT / UME (Du et al., ICML 2023) as BalanceBenchmark runs it
(``balancemm/trainer/UMT_trainer.py``): the teacher stage trains every modality alone, the
teachers are each modality's best epoch, frozen; the distillation loss is
``CE + scaling * sum_m MSE(z_m, t_m)`` recomputed by hand with dropout on; the student
restarts from the initial weights; a short run learns; resume is exact."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import equimodal.strategies.umt  # noqa: F401
from equimodal.data.batch import MultimodalBatch
from equimodal.engine.trainer import Trainer
from equimodal.strategies import build_strategy

from .interrupt import KillAt, Killed, strip_times
from .method_kit import first_batches, method_config
from .method_kit import set_up as setup


def config_for(modalities: int = 3, epochs: int = 3, extra=()):
    return method_config("umt", modalities, epochs, extra)


def batches(data, count: int) -> list[MultimodalBatch]:
    return first_batches(data, count, size=48)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


# ---------------------------------------------------------------------- teacher stage
@pytest.mark.parametrize("fusion", ["concat", "late"])
def test_teacher_stage_trains_each_modality_on_its_own_loss(fusion):
    config = config_for(3, extra=["model.encoder.dropout=0.3", f"model.fusion={fusion}"])
    data, model, strategy = setup(config)
    batch = batches(data, 1)[0]
    torch.manual_seed(11)
    model.train()
    losses = {}
    for m in model.modalities:  # the strategy's order: the dataset's
        z = model.encode_modality(m, batch.inputs[m])
        losses[m] = F.cross_entropy(model.modality_logits(m, z), batch.labels)
    own = {
        m: torch.autograd.grad(losses[m], model.modality_parameters(m), retain_graph=True)
        for m in model.modalities
    }
    for m in model.modalities:  # a modality's loss reaches no other encoder or projection
        for other in model.modalities:
            if other != m:
                grads = torch.autograd.grad(
                    losses[m],
                    model.modality_parameters(other),
                    retain_graph=True,
                    allow_unused=True,
                )
                assert all(g is None for g in grads)
    total = sum(losses.values())
    head = model.head_parameters()
    head_grads = torch.autograd.grad(total, head)
    torch.manual_seed(11)
    logs = strategy.training_step(batch)
    assert logs["loss"] == pytest.approx(float(total.detach()) / 3, rel=1e-6)
    for m in model.modalities:
        for p, g in zip(model.modality_parameters(m), own[m], strict=True):
            torch.testing.assert_close(p.grad, g)
    for p, g in zip(head, head_grads, strict=True):
        torch.testing.assert_close(p.grad, g)
    assert all(p.grad is None for p in model.fusion_parameters() if p not in set(head))


def test_a_modality_absent_from_the_batch_is_not_trained():
    config = config_for(2)
    data, model, strategy = setup(
        config, optimizer=lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
    )
    batch = batches(data, 1)[0]
    present = {"m0": batch.present["m0"], "m1": torch.zeros_like(batch.present["m1"])}
    batch = MultimodalBatch(batch.inputs, present, batch.labels, batch.indices)
    before = {m: [p.detach().clone() for p in model.modality_parameters(m)] for m in present}
    logs = strategy.training_step(batch)
    assert set(logs) == {"loss_m0", "loss"}
    for p, q in zip(model.modality_parameters("m1"), before["m1"], strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    assert any(
        not torch.equal(p, q)
        for p, q in zip(model.modality_parameters("m0"), before["m0"], strict=True)
    )


def test_each_teacher_is_its_modality_at_its_best_epoch():
    config = config_for(2, extra=["strategy.teacher_epochs=2"])
    data, model, strategy = setup(config, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    initial = snapshot(model)
    first, second = batches(data, 2)
    strategy.on_epoch_start(1)
    strategy.training_step(first)
    epoch1 = {m: [snapshot(x) for x in model.modality_modules(m)] for m in model.modalities}
    strategy.standalone_accuracy = {"m0": 0.8, "m1": 0.5}
    strategy.standalone_loss = {"m0": 0.6, "m1": 1.2}
    strategy.on_epoch_end(1, None)
    assert strategy.stage == 0 and not strategy.restarts_patience()
    strategy.on_epoch_start(2)
    strategy.training_step(second)
    epoch2 = {m: [snapshot(x) for x in model.modality_modules(m)] for m in model.modalities}
    strategy.standalone_accuracy = {"m0": 0.7, "m1": 0.6}
    strategy.standalone_loss = {"m0": 0.5, "m1": 1.1}
    strategy.on_epoch_end(2, None)
    assert strategy.stage == 1 and strategy.restarts_patience() and strategy.restarts_selection()
    assert strategy.teacher_epochs == {"m0": 1, "m1": 2}
    for m, kept in (("m0", epoch1["m0"]), ("m1", epoch2["m1"])):
        for module, state in zip(strategy.teacher.modality_modules(m), kept, strict=True):
            assert_same_state(snapshot(module), state)
    assert_same_state(snapshot(model), initial)  # the student starts where the run started
    assert not strategy.context.optimizer.state  # and with a fresh optimizer


# ---------------------------------------------------------------------- distillation
def distill_loss_by_hand(model, teachers, batch, scaling, seed):
    """``CE(fused) + scaling * sum_m MSE(z_m, t_m)`` over the present rows; the teachers in
    evaluation mode, the student in training mode (dropout drawn after ``seed``)."""
    torch.manual_seed(seed)
    model.train()
    out = model(batch)
    rows = torch.stack(list(batch.present.values())).any(0)
    loss = F.cross_entropy(out.logits[rows], batch.labels[rows])
    teachers.eval()
    for m in model.modalities:
        p = batch.present[m]
        with torch.no_grad():
            t = teachers.encode_modality(m, batch.inputs[m][p])
        loss = loss + scaling * ((out.features[m][p] - t) ** 2).mean()
    return loss


def test_distillation_loss_by_hand_with_dropout_on_and_frozen_teachers():
    extra = ["model.encoder.dropout=0.3", "strategy.scaling=2.5"]
    config = config_for(3, extra=extra)
    data, model, strategy = setup(config, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    train = batches(data, 4)
    for batch in train[:2]:
        strategy.training_step(batch)  # teacher stage
    teachers = copy.deepcopy(model)  # the weights the teachers must keep
    strategy.start_distillation(1)
    assert strategy.stage == 1
    optimizer = strategy.context.optimizer
    optimizer.param_groups[0]["lr"] = 0.0  # compare gradients first
    batch = train[2]
    present = {m: p.clone() for m, p in batch.present.items()}
    present["m1"][::4] = False
    batch = MultimodalBatch(batch.inputs, present, batch.labels, batch.indices)
    expected_loss = distill_loss_by_hand(model, teachers, batch, 2.5, seed=5)
    params = list(model.parameters())
    expected = torch.autograd.grad(expected_loss, params, allow_unused=True)
    torch.manual_seed(5)
    logs = strategy.training_step(batch)
    assert logs["loss"] == pytest.approx(float(expected_loss.detach()), rel=1e-5)
    assert logs["loss"] == pytest.approx(
        logs["ce"] + 2.5 * sum(logs[f"mse_{m}"] for m in model.modalities), rel=1e-5
    )
    for p, g in zip(params, expected, strict=True):
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, torch.zeros_like(p) if g is None else g)
    # the teachers never move: not in the optimizer, no gradient, evaluation mode
    optimizer.param_groups[0]["lr"] = 0.1
    strategy.training_step(train[3])
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in ids for p in strategy.teacher.parameters())
    assert all(p.grad is None and not p.requires_grad for p in strategy.teacher.parameters())
    assert not strategy.teacher.training
    assert_same_state(snapshot(strategy.teacher), snapshot(teachers))


def test_state_is_json_and_rebuilds_the_same_teachers():
    config = config_for(2, extra=["model.encoder.dropout=0.3"])
    data, model, strategy = setup(config, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    batch = batches(data, 1)[0]
    strategy.training_step(batch)
    strategy.start_distillation(1)
    state = json.loads(json.dumps(strategy.state_dict()))
    other = build_strategy(config.strategy)
    other.setup(strategy.context)
    other.load_state_dict(state)
    assert other.stage == 1 and other.teacher_epochs == {"m0": 1, "m1": 1}
    for m in model.modalities:
        x = batch.inputs[m]
        torch.testing.assert_close(
            other.teacher_features(m, x), strategy.teacher_features(m, x), atol=0, rtol=0
        )


# ---------------------------------------------------------------------- the loop
def test_short_run_switches_stage_and_the_student_learns():
    extra = ["model.encoder.dropout=0.3", "strategy.teacher_epochs=2"]
    result = Trainer(config_for(3, epochs=5, extra=extra), progress=False).fit()
    rows = result.history[1:]
    assert [row["stage"] for row in rows] == [0, 0, 1, 1, 1]
    assert set(rows[-1]["teacher_epochs"]) == {"m0", "m1", "m2"}
    # the student (not only the teachers' ensemble of the first epochs) learns
    assert rows[-1]["val"]["accuracy"] > 0.7  # 4 classes: chance is 0.25
    assert rows[-1]["train"]["mse_m0"] < rows[2]["train"]["mse_m0"]
    assert result.metrics["test"]["accuracy"] > 0.7


def test_teacher_patience_ends_the_teacher_stage_early():
    config = config_for(2, extra=["strategy.teacher_patience=1"])
    data, model, strategy = setup(config)
    strategy.standalone_accuracy = {"m0": 0.8, "m1": 0.5}
    strategy.standalone_loss = {"m0": 0.6, "m1": 1.2}
    strategy.on_epoch_end(1, None)
    assert strategy.stage == 0
    strategy.standalone_accuracy = {"m0": 0.8, "m1": 0.4}  # no modality improved
    strategy.on_epoch_end(2, None)
    assert strategy.stage == 1 and strategy.stage0_epochs == 2
    assert strategy.teacher_epochs == {"m0": 1, "m1": 1}


def test_ensemble_trains_the_unimodal_models_only():
    extra = ["model.fusion=late", "strategy.ensemble=true", "train.missing_rate=0.3"]
    result = Trainer(config_for(3, epochs=3, extra=extra), progress=False).fit()
    assert [row["stage"] for row in result.history[1:]] == [0, 0, 0]
    assert result.strategy.teacher is None
    assert set(result.history[-1]["train"]) == {"loss", "loss_m0", "loss_m1", "loss_m2"}
    assert result.metrics["test"]["accuracy"] > 0.7


def test_resume_in_either_stage_continues_exactly(tmp_path):
    extra = ["model.encoder.dropout=0.2", "train.patience=null", "strategy.teacher_epochs=2"]
    config = config_for(2, epochs=3, extra=extra)
    ref = Trainer(config, run_dir=tmp_path / "ref", progress=False).fit()
    assert [row["stage"] for row in ref.history[1:]] == [0, 0, 1]
    for epoch in (2, 3):  # killed in the teacher stage, then in the distillation stage
        run = tmp_path / f"killed{epoch}"
        with pytest.raises(Killed):
            Trainer(config, run_dir=run, progress=False, callbacks=[KillAt(epoch, 2)]).fit()
        resumed = Trainer(config, run_dir=run, progress=False, resume=True).fit()
        assert strip_times(resumed.history) == strip_times(ref.history)
        ours, theirs = strip_times(resumed.metrics), strip_times(ref.metrics)
        ours.pop("run"), theirs.pop("run")
        assert ours == theirs
        assert resumed.strategy.state_dict() == ref.strategy.state_dict()
