"""``relearning`` (Wei et al., ECCV 2024; github.com/GeWu-Lab/Diagnosing_Relearning_ECCV2024,
``code/ours.py``): purity of k-means clusters of each modality's training and validation
features, ``alpha_m = tanh(lambda |P_train - P_val|)``, and the soft re-initialisation
``theta <- alpha theta_init + (1 - alpha) theta`` of the encoders after epochs
``k * reinit_epoch + 1``."""

from __future__ import annotations

import json
import math

import pytest
import torch

import equimodal.strategies.relearning as relearning  # noqa: F401  (registers it)
from equimodal.config import build_config
from equimodal.data.registry import load_dataset
from equimodal.engine.callbacks import Callback
from equimodal.engine.trainer import Trainer, build_model
from equimodal.engine.validation import encode_split
from equimodal.strategies import TrainContext, build_strategy
from equimodal.strategies.relearning import (
    cluster_purity,
    kmeans,
    minmax_scale,
    purity,
    reinit_strength,
)

from .conftest import small_overrides

FAST = ["strategy.kmeans_restarts=2"]


def config_for(modalities: int = 3, epochs: int = 3, extra=(), samples: int = 600):
    signal = "[3.0, 1.5, 0.4]" if modalities == 3 else "[3.0, 0.8]"
    data = (
        f"dataset.options={{num_samples: {samples}, num_classes: 4, "
        f"num_modalities: {modalities}, signal: {signal}}}"
    )
    return build_config({}, [*small_overrides("relearning", epochs), data, *FAST, *extra])


def setup_strategy(config, lr: float = 0.0, seed: int = 0):
    data = load_dataset(config.dataset.name, seed=0, **config.dataset.options)
    torch.manual_seed(seed)
    model = build_model(config, data.info)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    strategy = build_strategy(config.strategy)
    strategy.setup(TrainContext(model, optimizer, data.modalities, data.num_classes, seed=0))
    return data, model, strategy


def blobs(per_class: int, classes: int, dim: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 10
    labels = torch.arange(classes).repeat_interleave(per_class)
    x = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm], labels[perm]


# ---------------------------------------------------------------------------- diagnosis
def test_purity_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    clusters = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    # cluster 0: labels 0,0,1 -> 2; cluster 1: 1,2 -> 1; cluster 2: 2,2 -> 2
    assert purity(labels, clusters) == pytest.approx(5 / 7)
    # labels need not be 0..C-1 (the official code renumbers them), cluster ids either
    assert purity(torch.tensor([3, 3, 7]), torch.tensor([5, 5, 5])) == pytest.approx(2 / 3)
    assert purity(labels, torch.arange(7)) == 1.0  # one sample per cluster


def test_minmax_scale_maps_columns_to_minus_one_one():
    x = torch.tensor([[0.0, 5.0, 2.0], [10.0, 5.0, 4.0], [5.0, 5.0, 3.0]])
    scaled = minmax_scale(x)
    expected = torch.tensor([[-1.0, -1.0, -1.0], [1.0, -1.0, 1.0], [0.0, -1.0, 0.0]])
    torch.testing.assert_close(scaled, expected)  # a constant column goes to -1 (sklearn)


def test_perfectly_separated_features_have_purity_one():
    x, y = blobs(per_class=25, classes=5, dim=8, spread=0.1, seed=1)
    for seed in (0, 1, 2):
        assert cluster_purity(x, y, num_classes=5, seed=seed, restarts=3) == 1.0
    # the same features with labels unrelated to them are far from pure
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert cluster_purity(x, shuffled, num_classes=5, seed=0, restarts=3) < 0.6


def test_kmeans_is_deterministic_given_the_seed():
    x, _ = blobs(per_class=40, classes=4, dim=6, spread=8.0, seed=3)  # overlapping blobs
    runs = [kmeans(x, 4, torch.Generator().manual_seed(7), restarts=2) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert set(runs[0].tolist()) == {0, 1, 2, 3}


def test_alpha_follows_tanh_of_the_purity_gap():
    assert reinit_strength(0.9, 0.6, 3.0) == pytest.approx(math.tanh(0.9))
    assert reinit_strength(0.6, 0.9, 3.0) == pytest.approx(math.tanh(0.9))  # |gap|
    assert reinit_strength(0.5, 0.45, 3.0) == pytest.approx(math.tanh(0.15))
    assert reinit_strength(0.7, 0.7, 3.0) == 0.0
    assert reinit_strength(math.nan, 0.7, 3.0) == 0.0  # no rows: left alone


def test_diagnose_turns_hand_made_purities_into_strengths(monkeypatch):
    _, _, strategy = setup_strategy(config_for(3))
    made = {  # (train, val) purity per modality, handed out in the order they are asked
        "m0": (0.95, 0.70),  # learnt much further on train than it generalises
        "m1": (0.60, 0.55),
        "m2": (0.40, 0.40),
    }
    asked = []

    def fake_purity(features, labels, num_classes, seed, **options):
        m = f"m{int(features[0, 0])}"  # the tag below
        asked.append(m)
        return made[m][0] if asked.count(m) == 1 else made[m][1]

    monkeypatch.setattr(relearning, "cluster_purity", fake_purity)

    def named(m):
        return torch.full((2, 3), float(m[1:]))  # tagged with the modality's number

    train_z = {m: named(m) for m in made}
    train_y = {m: torch.zeros(2, dtype=torch.long) for m in made}
    val = {m: (named(m), torch.zeros(2, dtype=torch.long)) for m in made}
    alphas = strategy.diagnose(train_z, train_y, val)
    for m, (pt, pv) in made.items():
        assert alphas[m] == pytest.approx(math.tanh(3.0 * abs(pt - pv)))
        assert strategy.diagnosis[m] == {"purity_train": pt, "purity_val": pv, "alpha": alphas[m]}
    assert alphas["m0"] > alphas["m1"] > alphas["m2"] == 0.0


# ---------------------------------------------------------------------------- re-initialisation
def test_soft_reinit_is_the_convex_combination_of_initial_and_current_weights():
    config = config_for(3, extra=["model.encoder.dropout=0.3"])
    data, model, strategy = setup_strategy(config, lr=0.1)
    names = model.modalities
    initial = {m: [p.detach().clone() for p in model.modality_parameters(m)] for m in names}
    strategy.on_epoch_start(1)
    batches = data.train.batches(64)
    for _ in range(3):  # move the weights away from their initial values
        strategy.training_step(next(batches))
    current = {m: [p.detach().clone() for p in model.modality_parameters(m)] for m in names}
    heads = [p.detach().clone() for p in model.fusion_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(initial["m0"], current["m0"], strict=True))
    alphas = {"m0": 0.25, "m1": 0.0, "m2": 1.0}
    strategy.reinitialise(alphas)
    for m in names:
        a = alphas[m]
        for p, p0, p1 in zip(model.modality_parameters(m), initial[m], current[m], strict=True):
            assert torch.equal(p, a * p0 + (1 - a) * p1), m
    for p, p0 in zip(model.modality_parameters("m2"), initial["m2"], strict=True):
        assert torch.equal(p, p0)  # alpha 1: back to the initial weights
    for p, h in zip(model.fusion_parameters(), heads, strict=True):
        assert torch.equal(p, h)  # the head is never re-initialised


@pytest.mark.parametrize(
    ("every", "count", "epochs"), [(20, 3, [21, 41, 61]), (1, 2, [2, 3]), (15, 0, [])]
)
def test_reinit_epochs_are_the_official_ones(every, count, epochs):
    """``epoch % reinit_epoch == 0 and epoch > 0`` (0-based) for the first ``reinit_num``."""
    config = config_for(2, extra=[f"strategy.reinit_epoch={every}", f"strategy.reinit_num={count}"])
    strategy = build_strategy(config.strategy)
    assert [e for e in range(1, 100) if strategy.is_reinit_epoch(e)] == epochs


class Watch(Callback):
    """At a re-initialisation epoch: the weights and the official diagnosis by hand."""

    def __init__(self, data, config):
        self.data, self.config = data, config
        self.checked = []

    def on_validation_end(self, trainer, state, report):
        strategy, model = state.strategy, state.model
        if not strategy.is_reinit_epoch(state.epoch):
            return
        # the kept batches are the whole training set, once
        rows = torch.cat([b.indices for b in strategy._kept]).sort().values
        assert torch.equal(rows, self.data.train.indices.sort().values)
        cfg = self.config.strategy
        options = {"restarts": cfg.kmeans_restarts, "iterations": 300, "tol": 1e-4}
        model.eval()  # the official get_feature: evaluation mode, no dropout
        val = encode_split(model, self.data.val)
        self.alpha = {}
        self.purity = {}
        with torch.no_grad():
            for m in model.modalities:
                z = torch.cat(
                    [model.encode_modality(m, b.inputs[m])[b.present[m]] for b in strategy._kept]
                )
                y = torch.cat([b.labels[b.present[m]] for b in strategy._kept])
                pt = cluster_purity(z, y, 4, self.config.seed, **options)
                keep = val.present[m]
                pv = cluster_purity(
                    val.z[m][keep], val.labels[keep], 4, self.config.seed, **options
                )
                self.purity[m] = (pt, pv)
                self.alpha[m] = math.tanh(cfg.move_lambda * abs(pt - pv))
        model.train()
        self.before = {
            m: [p.detach().clone() for p in model.modality_parameters(m)] for m in model.modalities
        }

    def on_epoch_end(self, trainer, state, row):
        if "reinit" not in row:
            return
        model, strategy = state.model, state.strategy
        for m in model.modalities:
            d = row["diagnosis"][m]
            assert (d["purity_train"], d["purity_val"]) == pytest.approx(self.purity[m])
            assert d["alpha"] == pytest.approx(self.alpha[m])
            a = d["alpha"]
            for p, p0, p1 in zip(
                model.modality_parameters(m), strategy.initial[m], self.before[m], strict=True
            ):
                torch.testing.assert_close(p, a * p0 + (1 - a) * p1, atol=0, rtol=0)
        self.checked.append(state.epoch)


def test_a_run_diagnoses_train_and_val_features_and_reinitialises_with_dropout_on():
    extra = [
        "model.encoder.dropout=0.3",
        "strategy.reinit_epoch=1",
        "strategy.reinit_num=2",
        "train.missing_rate=0.3",
    ]
    config = config_for(3, epochs=3, extra=extra, samples=400)
    data = load_dataset(config.dataset.name, seed=config.seed, **config.dataset.options)
    torch.manual_seed(config.seed)  # the trainer seeds the same way before building its model
    initial = build_model(config, data.info)
    watch = Watch(data, config)
    result = Trainer(config, data=data, progress=False, callbacks=[watch]).fit()
    assert watch.checked == [2, 3]
    assert any(watch.alpha[m] > 0 for m in watch.alpha)
    # the strategy's initial weights are the model's before training
    for m in data.modalities:
        for p0, q in zip(initial.modality_parameters(m), result.strategy.initial[m], strict=True):
            assert torch.equal(p0, q)
    rows = [r for r in result.history if "reinit" in r]
    assert [r["reinit"] for r in rows] == [1, 2]
    assert result.metrics["test"]["accuracy"] > 0.6  # it learns (chance: 0.25)


def test_state_is_json_and_carries_the_initial_weights():
    config = config_for(3, extra=["strategy.reinit_epoch=1"])
    _, _, strategy = setup_strategy(config, seed=0)
    state = json.loads(json.dumps(strategy.state_dict()))
    _, _, twin = setup_strategy(config, seed=1)  # another initial model
    assert not torch.equal(twin.initial["m0"][0], strategy.initial["m0"][0])
    twin.load_state_dict(state)
    for m in strategy.initial:
        for a, b in zip(twin.initial[m], strategy.initial[m], strict=True):
            assert torch.equal(a, b)
    # after the last re-initialisation the state no longer needs them
    strategy.epoch = 4  # reinit_num 3, every epoch: the last is epoch 4
    assert "initial" not in strategy.state_dict()


class Interrupt(Callback):
    def on_epoch_end(self, trainer, state, row):
        if state.epoch == 2:
            raise KeyboardInterrupt  # after epoch 2's re-initialisation and checkpoint


def test_resume_after_a_reinit_epoch_continues_exactly(tmp_path):
    extra = ["model.encoder.dropout=0.2", "strategy.reinit_epoch=1", "strategy.reinit_num=2"]
    config = config_for(2, epochs=3, extra=extra, samples=300)
    ref = Trainer(config, run_dir=tmp_path / "ref", progress=False).fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, run_dir=tmp_path / "cut", progress=False, callbacks=[Interrupt()]).fit()
    resumed = Trainer(config, run_dir=tmp_path / "cut", progress=False, resume=True).fit()

    def strip(rows):
        drop = {"train_time_s", "eval_time_s"}
        return [{k: v for k, v in r.items() if k not in drop} for r in rows]

    assert strip(resumed.history) == strip(ref.history)
    assert resumed.metrics["test"] == ref.metrics["test"]
    for a, b in zip(resumed.model.parameters(), ref.model.parameters(), strict=True):
        assert torch.equal(a, b)
