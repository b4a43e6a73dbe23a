"""Many modalities: sampled Shapley against exact on a model's value function, standard
errors in what the trainer records, and order sets evaluated as one batched computation
(the prefix tree of ``equimodal.models.order_tree``) equal to the loop over orders."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from equimodal.balance import (
    all_orders,
    hybrid_order_set,
    required_coalitions,
    sampled_shapley,
    shapley_values,
)
from equimodal.data.base import ModalitySpec
from equimodal.engine.validation import FeatureCache, evaluate_cache, predict_coalition_logits
from equimodal.models import MultimodalModel
from equimodal.models.order_tree import build_order_tree, tree_states


def memory_model(m: int, dim: int = 12, seed: int = 0, **memory) -> MultimodalModel:
    """A memory model over ``m`` modalities with non-zero alignment (so orders matter)."""
    torch.manual_seed(seed)
    specs = [ModalitySpec(f"m{i}", (4,)) for i in range(m)]
    model = MultimodalModel(specs, num_classes=3, dim=dim, fusion="memory", fusion_options=memory)
    mem = model.fusion.memory
    with torch.no_grad():
        if mem.align_learned:
            weight, bias = (torch.empty_like(t).normal_(0, 0.2) for t in mem.packed_maps())
            mem.load_packed_maps(weight, bias)
        mem.corr_ema.add_(0.1 * torch.randn_like(mem.corr_ema))
        model.fusion.head.weight.mul_(4.0)
    return model.eval()


def feature_cache(model: MultimodalModel, n: int, seed: int = 1, missing: float = 0.0):
    """Random features whose labels the model's own full-coalition prediction mostly gives
    (so coalition values spread between chance and 1)."""
    g = torch.Generator().manual_seed(seed)
    z = {m: torch.randn(n, model.dim, generator=g) for m in model.modalities}
    present = {m: torch.rand(n, generator=g) >= missing for m in model.modalities}
    with torch.no_grad():
        logits = model.fuse(z, {m: torch.ones(n, dtype=torch.bool) for m in z}).logits
    noise = torch.randint(0, model.num_classes, (n,), generator=g)
    labels = torch.where(torch.rand(n, generator=g) < 0.7, logits.argmax(1), noise)
    return FeatureCache(z=z, present=present, labels=labels)


def chain_only(model: MultimodalModel) -> MultimodalModel:
    """Turn the prefix tree off: several orders stacked on the batch axis, as before."""
    model.fusion.tree_min_work = math.inf
    return model


# ---------------------------------------------------------------- Shapley
def test_required_coalitions_are_exactly_what_the_estimate_asks_for():
    for m, max_exact in ((5, 8), (9, 8), (6, 4)):
        asked = set()

        def v(mask, asked=asked):
            asked.add(mask)
            return float(bin(mask).count("1") ** 1.5)

        shapley_values(v, m, max_exact_players=max_exact, num_permutations=7, seed=3)
        needed = required_coalitions(m, max_exact_players=max_exact, num_permutations=7, seed=3)
        assert set(needed) == asked
        assert needed == sorted(needed)


def test_sampling_is_used_above_eight_players_with_antithetic_pairs():
    table = np.random.default_rng(0).uniform(size=1 << 10)
    res = shapley_values(lambda s: float(table[s]), 10, num_permutations=16, seed=2)
    assert not res.exact and res.stderr is not None and np.all(np.isfinite(res.stderr))
    again = sampled_shapley(lambda s: float(table[s]), 10, 16, np.random.default_rng(2))
    np.testing.assert_array_equal(res.values, again.values)
    assert shapley_values(lambda s: float(table[s & 0xFF]), 8).exact


@pytest.mark.parametrize("value", ["accuracy", "true_class_prob"])
def test_sampled_model_values_within_three_standard_errors_of_exact(value):
    model = memory_model(6)
    cache = feature_cache(model, 300)
    prior = torch.full((3,), 1 / 3)
    orders = [tuple(f"m{i}" for i in o) for o in hybrid_order_set(6, max_orders=12, seed=1)]
    # a fixed seed: the z-scores are calibrated (over 200 seeds their mean is about 0 and
    # their spread about 1), so one of six exceeds 3 for a few seeds in a hundred
    common = dict(inference={"orders": orders}, value_kind=value, seed=1)
    exact = evaluate_cache(model, cache, "val", prior, max_exact=8, **common)
    sampled = evaluate_cache(model, cache, "val", prior, max_exact=5, permutations=150, **common)
    e, s = exact.schedule_shapley, sampled.schedule_shapley
    assert e.exact and not s.exact
    assert np.ptp(e.values) > 0.01  # the modalities differ, so the check means something
    assert np.all(s.stderr > 0)
    assert np.all(np.abs(s.values - e.values) <= 3 * s.stderr)
    assert s.values.sum() == pytest.approx(e.values.sum(), abs=1e-9)  # both efficient
    # the record carries a standard error next to each sampled value, none when exact
    assert set(sampled.to_dict()["shapley_stderr"]) == set(model.modalities)
    assert "shapley_stderr" not in exact.to_dict()


def test_batched_coalitions_give_the_shapley_values_of_one_coalition_at_a_time():
    model = memory_model(5)
    cache = feature_cache(model, 120, missing=0.1)  # some rows take the per-coalition path
    prior = torch.full((3,), 1 / 3)
    orders = [tuple(f"m{i}" for i in o) for o in hybrid_order_set(5, max_orders=10)]
    fast = evaluate_cache(model, cache, "val", prior, inference={"orders": orders})
    slow_model = chain_only(memory_model(5))
    table = {}
    names = model.modalities
    for mask in range(1 << 5):
        members = [names[i] for i in range(5) if mask >> i & 1]
        if not members:
            table[mask] = float((cache.labels == 0).float().mean())
            continue
        logits = torch.cat(
            [
                slow_model.fuse(
                    {m: v[rows] for m, v in cache.z.items()},
                    {m: v[rows] for m, v in cache.present.items()},
                    modalities=members,
                    orders=orders,
                ).logits
                for rows in (slice(0, 60), slice(60, 120))
            ]
        )
        table[mask] = float((logits.argmax(1) == cache.labels).float().mean())
    slow = shapley_values(table.__getitem__, 5)
    np.testing.assert_allclose(fast.shapley.values, slow.values, atol=1e-12)


def test_trainer_records_standard_errors_for_many_modalities(small_config):
    from equimodal.engine.trainer import Trainer

    config = small_config(
        extra=[
            "dataset.options={num_modalities: 9, num_samples: 240}",
            "train.epochs=1",
            "train.shapley.permutations=6",
        ]
    )
    result = Trainer(config, progress=False).fit()
    names = [f"m{i}" for i in range(9)]
    for record in (result.history[-1]["val"], result.metrics["test"]):
        assert list(record["shapley_stderr"]) == names
        assert all(math.isfinite(v) and v >= 0 for v in record["shapley_stderr"].values())
        assert set(record["shapley"]) == set(names)


# ---------------------------------------------------------------- order sets, batched
def mean_over_orders(model, z, present, orders, modalities=None):
    """The loop over orders: one chain per order, states averaged, then the head."""
    states = [model.fuse(z, present, modalities=modalities, orders=[o]).fused for o in orders]
    state = torch.stack(states).mean(0)
    return state, model.fusion.head(state)


@pytest.mark.parametrize(
    ("m", "orders"),
    [
        (3, [tuple(f"m{i}" for i in o) for o in all_orders(3)]),
        (
            6,
            [tuple(f"m{i}" for i in o) for o in hybrid_order_set(6, base_order=[5, 3, 1, 0, 2, 4])],
        ),
    ],
)
@pytest.mark.parametrize("path", ["tree", "stacked"])
def test_batched_order_set_equals_loop_over_orders(m, orders, path):
    model = memory_model(m)
    if path == "tree":
        model.fusion.tree_min_work = 0
    else:
        chain_only(model)
    cache = feature_cache(model, 40)
    ones = {k: torch.ones(40, dtype=torch.bool) for k in cache.z}
    out = model.fuse(cache.z, ones, orders=orders)
    state, logits = mean_over_orders(model, cache.z, ones, orders)
    torch.testing.assert_close(out.fused, state, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-6)
    # the orders really differ (else the test would not tell the paths apart)
    single = model.fuse(cache.z, ones, orders=orders[:1]).fused
    assert not torch.allclose(single, state, atol=1e-3)


@pytest.mark.parametrize(
    "memory",
    [
        {},
        {"align_stat": False},
        {"align_learned": False},
        {"align_stat": False, "align_learned": False},
    ],
)
def test_fuse_coalitions_equals_fuse_per_coalition(memory):
    model = memory_model(4, **memory)
    reference = chain_only(memory_model(4, **memory))
    cache = feature_cache(model, 50, missing=0.15)
    orders = [("m2", "m0", "m3", "m1"), ("m1", "m3", "m0", "m2"), ("m0", "m1", "m2", "m3")]
    weights = [2.0, 1.0, 0.5]
    coalitions = [c for k in range(1, 5) for c in itertools.combinations(model.modalities, k)]
    for o, w in ((orders, weights), (orders, None), (None, None)):
        batched = model.fuse_coalitions(cache.z, cache.present, coalitions, orders=o, weights=w)
        for c, got in zip(coalitions, batched, strict=True):
            want = reference.fuse(cache.z, cache.present, modalities=c, orders=o, weights=w)
            torch.testing.assert_close(got, want.logits, rtol=1e-5, atol=1e-6)


def test_fuse_coalitions_falls_back_for_other_fusions_and_calibration():
    torch.manual_seed(0)
    specs = [ModalitySpec(f"m{i}", (4,)) for i in range(3)]
    model = MultimodalModel(specs, num_classes=3, dim=8, fusion="concat").eval()
    cache = feature_cache(model, 20)
    coalitions = [("m0",), ("m1", "m2"), ("m0", "m1", "m2")]
    got = predict_coalition_logits(model, cache, coalitions)
    for c, logits in zip(coalitions, got, strict=True):
        want = model.fuse(cache.z, cache.present, modalities=c).logits
        torch.testing.assert_close(logits, want)


def test_prefix_tree_shares_prefixes_and_chunks_rows():
    tree = build_order_tree([[((0, 1, 2), 1.0)], [((0, 1, 3), 1.0), ((3, 1), 1.0)]])
    assert [len(level) for level in tree.levels] == [2, 2, 2]  # (0) (3); (0,1) (3,1); ...
    assert tree.num_nodes == 6 and tree.modalities() == [0, 1, 2, 3]
    # M = 6, exact Shapley under the default 24 hybrid orders: 534 distinct prefixes
    orders = hybrid_order_set(6)
    targets = []
    for mask in range(1, 64):
        induced = {tuple(i for i in o if mask >> i & 1) for o in orders}
        targets.append([(o, 1.0) for o in sorted(induced)])
    assert build_order_tree(targets).num_nodes == 534
    # rows processed in chunks give the same states
    model = memory_model(4)
    z = torch.randn(30, 4, model.dim)
    tree = build_order_tree([[(o, 1.0) for o in all_orders(4)], [((2, 0), 3.0), ((0, 2), 1.0)]])
    whole = tree_states(model.fusion.memory, z, tree)
    chunked = tree_states(model.fusion.memory, z, tree, level_budget=1)
    torch.testing.assert_close(whole, chunked)


def test_prefix_tree_refuses_bad_targets_and_training_mode():
    with pytest.raises(ValueError, match="repeats"):
        build_order_tree([[((0, 1, 0), 1.0)]])
    with pytest.raises(ValueError, match="positive total weight"):
        build_order_tree([[((0, 1), 0.0)]])
    with pytest.raises(ValueError, match="non-empty"):
        build_order_tree([[]])
    model = memory_model(3).train()
    with pytest.raises(RuntimeError, match="eval mode"):
        tree_states(
            model.fusion.memory, torch.randn(2, 3, model.dim), build_order_tree([[((0,), 1.0)]])
        )


def test_cli_prints_standard_errors_next_to_sampled_values(tmp_path):
    from typer.testing import CliRunner

    from equimodal.apps.cli import app

    from .conftest import small_overrides

    sets = small_overrides("joint", epochs=1) + [
        "dataset.options={num_modalities: 9, num_samples: 240}",
        "train.shapley.permutations=4",
    ]
    args = ["train", "-q", "--out", str(tmp_path)] + [x for o in sets for x in ("--set", o)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.count(" ± ") == 9  # one per modality, in the Shapley column
