"""Behaviour that defines each comparison method."""

from __future__ import annotations

import math

import pytest
import torch

from equimodal.data.registry import load_dataset
from equimodal.engine.trainer import Trainer, build_model
from equimodal.strategies import TrainContext, build_strategy
from equimodal.strategies.ogm_ge import modulation_coefficients

MODALITIES = ("m0", "m1", "m2")  # the synthetic data's, strongest first


def setup_strategy(config):
    data = load_dataset(config.dataset.name, seed=0, **config.dataset.options)
    torch.manual_seed(0)
    model = build_model(config, data.info)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step changes nothing
    strategy = build_strategy(config.strategy)
    strategy.setup(TrainContext(model, optimizer, data.modalities, data.num_classes, seed=0))
    return data, model, strategy


def encoder_grads(model, names):
    return {m: [p.grad.clone() for p in model.modality_parameters(m)] for m in names}


def test_ogm_ge_coefficients_by_hand():
    probs = {"a": torch.tensor([0.9, 0.9]), "b": torch.tensor([0.3, 0.3])}
    ratios, coefs = modulation_coefficients(probs, alpha=0.8)
    assert ratios["a"] == pytest.approx(3.0) and ratios["b"] == pytest.approx(1 / 3)
    assert coefs["a"] == pytest.approx(1 - math.tanh(0.8 * 3.0))
    assert coefs["b"] == 1.0


@pytest.mark.parametrize("noise", [False, True])
def test_ogm_ge_scales_only_the_dominant_encoder(small_config, noise):
    extra = ["model.fusion=concat", f"strategy.noise={noise}", "model.encoder.dropout=0"]
    config = small_config("ogm_ge", extra=extra)
    data, model, strategy = setup_strategy(config)
    batch = next(data.train.batches(128))
    # plain gradients of the same loss
    out = model(batch)
    torch.nn.functional.cross_entropy(out.logits, batch.labels).backward()
    plain = encoder_grads(model, data.modalities)
    model.zero_grad(set_to_none=True)
    strategy.on_epoch_start(1)
    logs = strategy.training_step(batch)
    modulated = encoder_grads(model, data.modalities)
    ratios = {m: logs[f"ratio_{m}"] for m in data.modalities}
    dominant = [m for m, r in ratios.items() if r > 1]
    assert dominant  # with a strong m0 at least one modality leads
    for m in data.modalities:
        k = 1 - math.tanh(0.8 * ratios[m]) if m in dominant else 1.0
        assert logs[f"coef_{m}"] == pytest.approx(k)
        params = model.modality_parameters(m)
        for p, g_plain, g_mod in zip(params, plain[m], modulated[m], strict=True):
            if p.dim() < 2:  # biases and norms: never modulated, as the official code
                torch.testing.assert_close(g_mod, g_plain)
            elif noise:
                assert not torch.allclose(g_mod, k * g_plain)  # GE noise on every encoder
            else:
                torch.testing.assert_close(g_mod, k * g_plain)


def test_ogm_ge_outside_its_epochs_is_joint_training(small_config):
    config = small_config("ogm_ge", extra=["strategy.modulation_end=0"])
    data, model, strategy = setup_strategy(config)
    strategy.on_epoch_start(1)
    logs = strategy.training_step(next(data.train.batches(64)))
    assert set(logs) == {"loss"}


def test_ogm_ge_trains(small_config):
    result = Trainer(small_config("ogm_ge", epochs=4), progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.6


def test_unimodal_trains_only_its_modality_and_is_fully_imbalanced(small_config):
    config = small_config("unimodal", epochs=3, extra=["strategy.modality=m1"])
    data = load_dataset(config.dataset.name, seed=0, **config.dataset.options)
    torch.manual_seed(0)  # the trainer seeds the same way before building its model
    initial = build_model(config, data.info)
    before = {m: [p.clone() for p in initial.modality_parameters(m)] for m in data.modalities}
    result = Trainer(config, progress=False).fit()
    after = {m: list(result.model.modality_parameters(m)) for m in data.modalities}
    for m in data.modalities:
        changed = any(not torch.equal(a, b) for a, b in zip(before[m], after[m], strict=True))
        assert changed == (m == "m1"), m
    test = result.metrics["test"]
    assert test["shapley"]["m0"] == 0.0 and test["shapley"]["m2"] == 0.0
    assert test["shapley"]["m1"] == pytest.approx(test["v_all"] - test["v_empty"])
    assert test["edm"] == pytest.approx(1.0)


def test_unimodal_unknown_modality_is_named(small_config):
    config = small_config("unimodal", extra=["strategy.modality=m7"])
    with pytest.raises(ValueError, match="'m7'.*m0, m1, m2"):
        Trainer(config, progress=False).fit()


def test_mla_projection_turns_the_head_gradient_away_from_the_current_feature(small_config):
    # the official GSPlugin (tests/test_fidelity.py checks it number by number): the run's
    # first unimodal step is left alone; every later one first removes the current
    # modality's batch-mean feature r from the projector P, then uses grad P^T
    config = small_config("mla", extra=["model.encoder.dropout=0"])
    data, model, strategy = setup_strategy(config)
    batch = next(data.train.batches(128))
    with torch.no_grad():
        r = model.encode_modality("m2", batch.inputs["m2"]).mean(0)
    strategy.training_step(batch)  # lr 0: the encoders stay as they were
    projected = model.fusion.head.weight.grad  # the last step's (m2), after the projection
    config = small_config("mla", extra=["strategy.projection=false", "model.encoder.dropout=0"])
    data, model, strategy = setup_strategy(config)
    strategy.training_step(batch)
    plain = model.fusion.head.weight.grad

    def alignment(grad):
        return float((grad @ r).norm() / (grad.norm() * r.norm()))

    assert alignment(projected) < 0.5 * alignment(plain)


def test_shared_head_entropy_fusion_weights_confident_modalities():
    from equimodal.models.fusion import SharedHeadFusion

    fusion = SharedHeadFusion(["a", "b"], dim=2, num_classes=2)
    with torch.no_grad():
        fusion.head.weight.copy_(torch.eye(2))
        fusion.head.bias.zero_()
    z = {"a": torch.tensor([[4.0, 0.0]]), "b": torch.tensor([[0.0, 0.5]])}
    present = {"a": torch.tensor([True]), "b": torch.tensor([True])}
    out = fusion(z, present, combine="entropy").logits

    def entropy(logits):
        p = torch.softmax(logits, -1)
        return -(p * p.log()).sum()

    e = torch.stack([entropy(z["a"][0]), entropy(z["b"][0])])
    weights = torch.exp(e.max() - e) / torch.exp(e.max() - e).sum()
    torch.testing.assert_close(out[0], weights[0] * z["a"][0] + weights[1] * z["b"][0])
    assert weights[0] > weights[1]  # the confident modality weighs more
    present["b"] = torch.tensor([False])
    torch.testing.assert_close(fusion(z, present, combine="entropy").logits, z["a"])  # absent


def test_mla_trains_and_saves_its_projector(small_config, tmp_path):
    from equimodal.engine.trainer import load_run

    result = Trainer(small_config("mla", epochs=4), run_dir=tmp_path / "r", progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.8
    _, _, strategy, _ = load_run(tmp_path / "r")
    p = strategy.projector  # restored from the checkpoint, Frobenius norm 1
    assert not torch.allclose(p, torch.eye(p.shape[0]))
    assert float(torch.linalg.matrix_norm(p)) == pytest.approx(1.0, abs=1e-5)


def test_calibration_restores_nll_after_one_modality_is_scaled_tenfold(small_config):
    from equimodal.apps.diagnose import model_decision_diagnostics as decision_diagnostics
    from equimodal.balance.decision import apply_calibration, fit_calibration
    from equimodal.engine.validation import encode_split

    result = Trainer(
        small_config("joint", epochs=4, extra=["model.fusion=concat"]), progress=False
    ).fit()
    model = result.model
    data = load_dataset("synthetic", seed=0, num_samples=600, num_classes=4, signal=[3.0, 1.5, 0.4])
    cache = encode_split(model, data.val)
    nll = torch.nn.functional.cross_entropy
    with torch.no_grad():
        logits = model.fusion.unimodal_logits(cache.z)
        unscaled = nll(sum(logits.values()), cache.labels)
        before = decision_diagnostics(model, cache)
        block = model.fusion.head.weight[:, : model.dim]
        block.mul_(10.0)  # modality m0's logits x10 (its bias share aside)
        scaled_logits = model.fusion.unimodal_logits(cache.z)
    scaled = nll(sum(scaled_logits.values()), cache.labels)
    assert scaled > unscaled + 0.05
    after = decision_diagnostics(model, cache)
    assert after["m0"]["weight_norm"] == pytest.approx(10 * before["m0"]["weight_norm"], rel=1e-5)
    assert after["m0"]["true_logit_share"] > before["m0"]["true_logit_share"]
    calibration = fit_calibration(scaled_logits, cache.labels)
    calibrated = nll(apply_calibration(scaled_logits, cache.present, calibration), cache.labels)
    assert calibrated <= unscaled + 1e-3
    w = calibration.weight
    assert torch.all(w > 0) and torch.allclose(w.sum(0), torch.full((4,), 3.0))


def test_decision_calibration_strategy_fits_on_validation_only(small_config, tmp_path, monkeypatch):
    from equimodal.engine.trainer import load_run
    from equimodal.strategies import decision_calibration

    config = small_config("decision_calibration", epochs=3)
    data = load_dataset(config.dataset.name, seed=config.seed, **config.dataset.options)
    fitted = []  # (labels, calibration) of every fit

    def recording_fit(logits, labels, **kwargs):
        calibration = original(logits, labels, **kwargs)
        fitted.append((labels.detach().cpu().clone(), calibration))
        return calibration

    original = decision_calibration.fit_calibration
    monkeypatch.setattr(decision_calibration, "fit_calibration", recording_fit)

    def split_of(labels):
        """The split whose labels, row for row, these are (None: none of them)."""
        for name in ("train", "val", "test"):
            split = data.split(name).labels
            if split.shape == labels.shape and torch.equal(split, labels):
                return name
        return None

    # the check below tells the splits apart: a calibration fitted on test (or train)
    # would be named so, and the assertion on every fit would fail
    assert split_of(data.test.labels) == "test" and split_of(data.train.labels) == "train"
    result = Trainer(config, data=data, run_dir=tmp_path / "r", progress=False).fit()
    # before training, after each epoch, and the final validation pass; never test
    assert len(fitted) >= config.train.epochs + 1
    assert [split_of(labels) for labels, _ in fitted] == ["val"] * len(fitted)
    # test is scored with the calibration of the selected model's final validation pass
    assert result.metrics["inference"]["calibration"] == fitted[-1][1].to_dict()
    assert result.metrics["test"]["accuracy"] > 0.8
    _, _, strategy, _ = load_run(tmp_path / "r")
    assert strategy.calibration is not None  # restored from the checkpoint


@pytest.mark.parametrize("fusion", ["concat", "memory"])
def test_agm_responses_sum_to_the_model_output(small_config, fusion):
    config = small_config("agm", extra=[f"model.fusion={fusion}", "model.encoder.dropout=0"])
    data, model, strategy = setup_strategy(config)
    batch = next(data.train.batches(32))
    model.eval()  # no statistics move between the passes compared here
    phi, full = strategy.responses(batch)
    torch.testing.assert_close(sum(phi.values()), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, model(batch).logits, atol=1e-5, rtol=1e-5)


def test_agm_coefficient_raises_the_lagging_modality():
    from equimodal.strategies.agm import response_coefficients

    # modality a's loss rose above its running average while b held: a falls behind
    kappa = response_coefficients({"a": 1.0, "b": 0.5}, {"a": 0.5, "b": 0.5}, alpha=1.0, clip=10)
    assert kappa["a"] > 1.0 > kappa["b"]
    assert response_coefficients({"a": 1.0, "b": 0.5}, None, 1.0, 10) == {"a": 1.0, "b": 1.0}
    capped = response_coefficients({"a": 50.0, "b": 0.0}, {"a": 0.0, "b": 50.0}, 1.0, clip=0.5)
    assert capped["a"] == pytest.approx(math.exp(0.5))


def test_agm_scales_the_gradient_into_each_response():
    from equimodal.strategies.agm import scale_gradient

    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = scale_gradient(x, 3.0)
    torch.testing.assert_close(y, x.detach())
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([3.0, 3.0]))


def test_agm_trains_and_logs_coefficients(small_config):
    result = Trainer(small_config("agm", epochs=3), progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.8
    last = result.history[-1]["train"]
    assert last["kappa_m0"] < 1.0 < last["kappa_m2"]  # the strong modality is held back


def test_udi_js_and_infonce_by_hand():
    from equimodal.strategies.udi import choose_anchor, infonce_mutual_information, js_divergence

    same = torch.tensor([[2.0, 0.0, -1.0]])
    assert float(js_divergence(same, same)) == pytest.approx(0.0, abs=1e-7)
    far = torch.tensor([[50.0, 0.0]]), torch.tensor([[0.0, 50.0]])
    assert float(js_divergence(*far)) == pytest.approx(math.log(2.0), abs=1e-5)  # the maximum
    z = torch.eye(4)
    # identical features: the bound approaches log B; unrelated (constant) ones give 0
    assert float(infonce_mutual_information(z, z, 0.01)) == pytest.approx(math.log(4), abs=1e-3)
    assert float(infonce_mutual_information(z, torch.ones(4, 4), 0.1)) == pytest.approx(0.0)
    assert choose_anchor({"a": 0.8, "b": 0.9}, {"a": 0.1, "b": 0.5}) == "b"
    assert choose_anchor({"a": 0.9, "b": 0.9}, {"a": 0.7, "b": 0.5}) == "b"  # entropy tie-break


def test_udi_anchor_is_the_best_standalone_modality_and_stays_frozen(small_config):
    config = small_config(
        "udi", epochs=6, extra=["strategy.anchor_epochs=3", "train.patience=null"]
    )
    snapshots = {}
    trainer = Trainer(config, progress=False)

    def watch(row):
        if row["epoch"] in (3, 6):  # end of stage 0, end of the run
            model = trainer.model
            snapshots[row["epoch"]] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    trainer.on_epoch = watch
    result = trainer.fit()
    history = result.history
    stage0 = history[3]
    assert [r["stage"] for r in history[1:]] == [0, 0, 0, 1, 1, 1]
    anchor = stage0["anchor"]
    # the best stand-alone accuracy over stage 0, modality by modality
    best = {m: max(r["standalone_val_accuracy"][m] for r in history[1:4]) for m in MODALITIES}
    assert best[anchor] == max(best.values())
    assert anchor == "m0"  # the synthetic data's strong modality
    before, after = snapshots[3], snapshots[6]
    for key in before:
        owner = key.split(".")
        frozen = (owner[0] in ("encoders", "projections") and owner[1] == anchor) or (
            owner[:3] == ["fusion", "heads", anchor]
        )
        assert torch.equal(before[key], after[key]) == frozen, key
    assert 0.0 < history[-1]["interaction_weight"] < 1.0
    assert result.metrics["test"]["accuracy"] > 0.8


def predictor_keys(state: dict[str, torch.Tensor], modality: str) -> list[str]:
    """The keys of ``modality``'s encoder, projection and own head in a late-fusion model."""
    prefixes = (f"encoders.{modality}.", f"projections.{modality}.", f"fusion.heads.{modality}.")
    return [k for k in state if k.startswith(prefixes)]


@pytest.mark.parametrize("weights_in_state", [True, False])
def test_udi_freezes_the_anchor_at_its_best_standalone_epoch(
    small_config, monkeypatch, weights_in_state
):
    from equimodal.engine.callbacks import Callback
    from equimodal.strategies import udi

    if not weights_in_state:  # too large for checkpoints: kept in memory only
        monkeypatch.setattr(udi, "STATE_WEIGHTS_LIMIT", 0)

    # stage 0 lasts six epochs; m0's stand-alone accuracy peaks at epoch 4, not 6
    config = small_config(
        "udi",
        epochs=7,
        extra=["strategy.anchor_epochs=6", "optim.lr=0.05", "train.patience=null"],
    )

    def clone(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    class Snapshots(Callback):
        def __init__(self):
            self.validated = {}  # the weights each epoch was validated with
            self.ended = {}  # the weights once the strategy has seen the epoch

        def on_validation_end(self, trainer, state, report):
            self.validated[state.epoch] = clone(trainer.model)

        def on_epoch_end(self, trainer, state, row):
            self.ended[state.epoch] = clone(trainer.model)
            if state.epoch < 6:  # stage 0: every modality's best is in the state, or not
                kept = state.strategy.state_dict()["best"]
                assert set(kept) == set(MODALITIES)
                assert all(("modules" in v) == weights_in_state for v in kept.values())
            else:  # the anchor is frozen: no weights are kept any more
                assert "best" not in state.strategy.state_dict()

    snapshots = Snapshots()
    result = Trainer(config, progress=False, callbacks=[snapshots]).fit()
    history = result.history
    assert [r["stage"] for r in history[1:]] == [0] * 6 + [1]
    anchor = history[6]["anchor"]
    accuracy = [r["standalone_val_accuracy"][anchor] for r in history[1:7]]
    best_epoch = 1 + accuracy.index(max(accuracy))
    assert accuracy.count(max(accuracy)) == 1 and best_epoch != 6  # what this test is about
    assert history[6]["anchor_epoch"] == best_epoch
    keys = predictor_keys(snapshots.ended[6], anchor)
    assert keys
    at_best, last = snapshots.validated[best_epoch], snapshots.validated[6]
    assert any(not torch.equal(at_best[k], last[k]) for k in keys)
    for frozen in (snapshots.ended[6], snapshots.ended[7]):  # restored, then frozen
        for k in keys:
            torch.testing.assert_close(frozen[k], at_best[k], rtol=0, atol=0, msg=k)
    # the other modalities keep their last stage-0 weights into stage 1
    for k, v in snapshots.ended[6].items():
        if k not in keys:
            assert torch.equal(v, last[k]), k
    # the frozen anchor predicts as it did at its best epoch
    assert history[7]["standalone_val_accuracy"][anchor] == max(accuracy)


def test_udi_state_without_weights_forgets_those_epochs(small_config):
    data, model, strategy = setup_strategy(small_config("udi", extra=["model.encoder.dropout=0"]))
    strategy.standalone_accuracy = {m: 0.5 for m in MODALITIES}
    strategy.standalone_loss = {m: 1.0 for m in MODALITIES}
    strategy.standalone_entropy = {m: 1.0 for m in MODALITIES}
    strategy._keep_best(1)
    state = strategy.state_dict()
    kept = state["best"]["m1"]["modules"]
    assert len(kept) == len(model.modality_modules("m1", with_head=True))
    # the encoded weights are the tensors, bit for bit
    for module, saved in zip(model.modality_modules("m1", with_head=True), kept, strict=True):
        for k, v in module.state_dict().items():
            assert torch.equal(udi_decode(saved[k]), v.cpu()), k
    strategy.load_state_dict(state)
    assert set(strategy.best) == set(MODALITIES)
    state["best"]["m1"].pop("modules")  # as written over the size limit
    strategy.load_state_dict(state)
    assert set(strategy.best) == {"m0", "m2"}


def udi_decode(encoded):
    from equimodal.strategies.udi import decode_tensor

    return decode_tensor(encoded)


def test_udi_forced_anchor_must_exist(small_config):
    config = small_config("udi", extra=["strategy.anchor=m9"])
    with pytest.raises(ValueError, match="anchor 'm9'"):
        Trainer(config, progress=False).fit()
