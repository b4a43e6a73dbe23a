"""``valuation`` (Wei et al., CVPR 2024; github.com/GeWu-Lab/Valuate-and-Enhance-Multimodal-
Cooperation): per-sample Shapley contributions of ``v(S) = |S| [correct]`` and the extra
unimodal copies of the low-contributing modality, each recomputed by hand."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import equimodal.strategies.valuation  # noqa: F401  (registers the strategy)
from equimodal.balance.shapley import exact_shapley_from_table
from equimodal.config import build_config
from equimodal.engine.trainer import Trainer
from equimodal.strategies.valuation import (
    coalition_values,
    copy_counts,
    resample_fraction,
    sample_shapley,
)

from .conftest import small_overrides
from .method_kit import first_batches as batches
from .method_kit import set_up as setup

SIGNALS = {2: "[3.0, 0.8]", 3: "[3.0, 1.5, 0.4]"}


def config_for(modalities: int = 3, epochs: int = 3, extra=()):
    data = (
        f"dataset.options={{num_samples: 600, num_classes: 4, num_modalities: {modalities}, "
        f"signal: {SIGNALS[modalities]}}}"
    )
    return build_config(
        {}, [*small_overrides("valuation", epochs), data, "strategy.warmup=1", *extra]
    )


def official_copies(contrib: float) -> int:
    """``AV_KS_Dataset_sample_level``'s open bins."""
    if 0.4 < contrib < 1:
        return 1
    if -0.1 < contrib < 0.4:
        return 2
    if contrib < -0.1:
        return 3
    return 0


# ---------------------------------------------------------------------------- Shapley
def test_two_modalities_are_the_official_formula():
    """Every correctness pattern of (all, a, v): ``contrib_a = (value_a + value_all -
    value_v) / 2`` with ``value_all = 2``, ``value_a = value_v = 1`` (``sample_level.py``)."""
    for right_all, right_a, right_v in itertools.product([False, True], repeat=3):
        correct = torch.tensor([[False, right_a, right_v, right_all]])  # masks 0, a, v, av
        phi = sample_shapley(coalition_values(correct, torch.ones(1, 2, dtype=torch.bool)))
        value_all, value_a, value_v = 2.0 * right_all, 1.0 * right_a, 1.0 * right_v
        contrib_a = (value_a + value_all - value_v) / 2.0
        contrib_v = (value_v + value_all - value_a) / 2.0
        assert phi[0].tolist() == [contrib_a, contrib_v]
        counts = copy_counts(phi)[0].tolist()
        assert counts == [official_copies(contrib_a), official_copies(contrib_v)]


def test_three_modalities_by_hand():
    # right with a, a+b and all three only: v(a)=1, v(ab)=2, v(abc)=3, the rest 0
    right = {"a", "ab", "abc"}
    names = "abc"
    masks = ["".join(n for i, n in enumerate(names) if mask >> i & 1) for mask in range(8)]
    correct = torch.tensor([[m in right for m in masks]])
    phi = sample_shapley(coalition_values(correct, torch.ones(1, 3, dtype=torch.bool)))
    # phi_a = 1/3 (1 - 0) + 1/6 ((2 - 0) + (0 - 0)) + 1/3 (3 - 0) = 5/3, and so on
    torch.testing.assert_close(phi[0], torch.tensor([5 / 3, 7 / 6, 1 / 6], dtype=torch.float64))
    assert float(phi.sum()) == pytest.approx(3.0)  # efficiency: v(all)
    assert copy_counts(phi)[0].tolist() == [0, 0, 2]  # c, the low contributor, twice
    # c absent from the row: S counts only present members, c is a dummy (0)
    right = {"a", "ab", "ac", "abc", "c"}  # {c} alone "right" from the fill: worth |{}| = 0
    correct = torch.tensor([[m in right for m in masks]])
    present = torch.tensor([[True, True, False]])
    values = coalition_values(correct, present)
    assert values[0].tolist() == [0, 1, 0, 2, 0, 1, 0, 2]
    phi = sample_shapley(values)
    torch.testing.assert_close(phi[0], torch.tensor([1.5, 0.5, 0.0], dtype=torch.float64))
    ref = exact_shapley_from_table(values[0].numpy())
    np.testing.assert_allclose(phi[0].numpy(), ref.values)


def test_copy_bins_and_modality_level_fraction():
    phi = torch.tensor(
        [1.5, 1.0, 0.99, 0.5, 0.4, 0.39, 0.0, -0.1, -0.11, -0.5], dtype=torch.float64
    )
    # one copy per threshold 1, 0.4, -0.1 strictly above phi
    assert copy_counts(phi).tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    fraction, target = resample_fraction({"a": 1.2, "v": 0.6}, alpha=1.0)
    # official: |gap_a - gap_v| / 3 * 2 * alpha, the larger gap kept
    assert fraction == pytest.approx(abs((1 - 1.2) - (1 - 0.6)) / 3 * 2)
    assert target == "v"
    fraction, target = resample_fraction({"a": 1.0, "b": 0.2, "c": 0.7}, alpha=0.5)
    assert fraction == pytest.approx(0.5 * 2 / 3 * (0.8 - 0.0)) and target == "b"


def test_valuation_of_the_model_by_hand_with_dropout():
    config = config_for(3, extra=["model.encoder.dropout=0.3"])
    data, model, strategy = setup(config)
    batch = batches(data, 1, size=32)[0]
    batch.present["m1"][::3] = False
    model.train()
    phi = strategy.valuate(batch)
    assert model.training  # the mode is restored
    names = model.modalities
    model.eval()
    with torch.no_grad():
        z = model.encode(batch)
        table = torch.zeros(len(batch), 8, dtype=torch.float64)
        for mask in range(1, 8):
            members = [m for i, m in enumerate(names) if mask >> i & 1]
            logits = model.fuse(z, batch.present, modalities=members).logits
            right = (logits.argmax(1) == batch.labels).double()
            size = sum(batch.present[m].double() for m in members)
            table[:, mask] = size * right
    model.train()
    for r in range(len(batch)):
        ref = exact_shapley_from_table(table[r].numpy()).values
        np.testing.assert_allclose(phi[r].numpy(), ref, atol=1e-12)
    absent = ~batch.present["m1"]
    assert bool((phi[absent, 1] == 0).all())


# ---------------------------------------------------------------------------- training
def test_copies_train_the_low_contributing_modality_alone_with_dropout():
    config = config_for(3, extra=["model.encoder.dropout=0.3"])
    data, model, strategy = setup(config)  # lr 0: the parameters stay as they are
    batch = batches(data, 1)[0]
    batch.present["m2"][::4] = False
    strategy.on_epoch_start(2)  # after the warm-up
    model.train()
    phi = strategy.valuate(batch)
    counts = copy_counts(phi) * torch.stack([batch.present[m] for m in model.modalities], 1)
    assert int(counts.sum()) > 0
    # the enhancement goes to each sample's low contributor(s) first
    low = phi.argmin(1)
    for r in range(len(batch)):
        if all(bool(batch.present[m][r]) for m in model.modalities):
            assert int(counts[r, low[r]]) == int(counts[r].max())
    torch.manual_seed(5)
    logs = strategy.training_step(batch)
    # by hand: the fused CE of every row and one unimodal CE per copy (its own dropout)
    torch.manual_seed(5)
    total = F.cross_entropy(model(batch).logits, batch.labels, reduction="sum")
    seen = len(batch)
    for k, m in enumerate(model.modalities):
        rows = [r for r in range(len(batch)) for _ in range(int(counts[r, k]))]
        assert logs[f"copies_{m}"] == pytest.approx(len(rows) / len(batch))
        if not rows:
            continue
        idx = torch.tensor(rows)
        zc = model.encode_modality(m, batch.inputs[m][idx])
        ones = {m: torch.ones(len(rows), dtype=torch.bool)}
        logits = model.fuse({m: zc}, ones, modalities=[m]).logits
        total = total + F.cross_entropy(logits, batch.labels[idx], reduction="sum")
        seen += len(rows)
    assert logs["loss"] == pytest.approx(float(total.detach()) / seen, rel=1e-6)
    for k, m in enumerate(model.modalities):
        assert logs[f"phi_{m}"] == pytest.approx(float(phi[:, k].mean()))


def test_warmup_is_joint_training():
    config = config_for(2)
    data, model, strategy = setup(config)
    batch = batches(data, 1)[0]
    strategy.on_epoch_start(1)  # warmup=1: epoch 1 trains jointly
    torch.manual_seed(0)
    logs = strategy.training_step(batch)
    torch.manual_seed(0)
    expected = F.cross_entropy(model(batch).logits, batch.labels)
    assert logs == {"loss": pytest.approx(float(expected.detach()), rel=1e-6)}


def test_modality_level_values_a_share_and_resamples_the_target():
    config = config_for(3, extra=["strategy.level=modality", "strategy.part_ratio=1.0"])
    data, model, strategy = setup(config)
    first, second = batches(data, 2)
    strategy.on_epoch_start(1)  # the warm-up's last epoch is valued
    strategy.training_step(first)
    phi = strategy.valuate(first)
    for k, m in enumerate(model.modalities):  # part_ratio 1: every row
        assert strategy.sums[m] == pytest.approx(float(phi[:, k].sum()))
        assert strategy.counts[m] == len(first)
    strategy.on_epoch_start(2)
    mean = {m: float(phi[:, k].mean()) for k, m in enumerate(model.modalities)}
    gaps = {m: 1 - c for m, c in mean.items()}
    target = max(gaps, key=gaps.get)
    assert strategy.target == target
    assert strategy.fraction == pytest.approx(2 / 3 * (gaps[target] - min(gaps.values())))
    counts, _ = strategy.plan(second)
    k = model.modalities.index(target)
    assert int(counts.sum()) == int(counts[:, k].sum())  # only the target is re-sampled
    expected = strategy.fraction * len(second)
    assert math.floor(expected) <= int(counts.sum()) <= math.floor(expected) + 1


def test_modality_level_resumes_exactly():
    config = config_for(2, extra=["strategy.level=modality", "strategy.alpha=3.0"])
    data, model, strategy = setup(config, lr=0.1)
    steps = batches(data, 6)
    strategy.on_epoch_start(1)
    for batch in steps[:3]:
        strategy.training_step(batch)
    state = json.loads(json.dumps(strategy.state_dict()))
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    def epoch_two(strategy):
        strategy.on_epoch_start(2)
        torch.manual_seed(1)
        return [strategy.training_step(batch) for batch in steps[3:]]

    logs = epoch_two(strategy)
    assert any(log.get(f"copies_{strategy.target}", 0) > 0 for log in logs)
    _, model2, strategy2 = setup(config, lr=0.1)
    model2.load_state_dict(saved)
    strategy2.load_state_dict(state)
    assert epoch_two(strategy2) == logs
    for (n, p), q in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    assert strategy2.state_dict() == strategy.state_dict()


def test_sample_level_trains_three_modalities_with_dropout_and_missing_rows():
    extra = ["model.encoder.dropout=0.3", "train.missing_rate=0.2"]
    result = Trainer(config_for(3, epochs=3, extra=extra), progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.6  # chance: 0.25
    last = result.history[-1]["train"]
    assert {"copies_m0", "copies_m1", "copies_m2", "phi_m0"} <= set(last)
