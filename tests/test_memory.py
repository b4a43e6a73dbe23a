"""Behaviour of the cross-modal memory and the model's subset / order handling."""

from __future__ import annotations

import itertools

import pytest
import torch

from equimodal.data.base import ModalitySpec
from equimodal.data.batch import MultimodalBatch
from equimodal.models import MultimodalModel, induce_orders
from equimodal.models.memory import CrossModalMemory, batch_cross_correlation

NAMES = ("a", "b", "c")


def make_model(fusion: str = "memory", seed: int = 0) -> MultimodalModel:
    torch.manual_seed(seed)
    specs = [ModalitySpec(n, (d,)) for n, d in zip(NAMES, (5, 7, 3), strict=True)]
    model = MultimodalModel(specs, num_classes=4, dim=8, fusion=fusion)
    # non-zero learned maps so that alignment matters in the tests
    if fusion == "memory":
        mem = model.fusion.memory
        weight, bias = (torch.empty_like(t).normal_(0, 0.3) for t in mem.packed_maps())
        mem.load_packed_maps(weight, bias)
    return model.eval()


def features(b: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(b, 8, generator=g) for n in NAMES}


def all_present(b: int = 6) -> dict[str, torch.Tensor]:
    return {n: torch.ones(b, dtype=torch.bool) for n in NAMES}


def test_missing_modality_equals_chain_without_it():
    model = make_model()
    z = features()
    present = all_present()
    present["b"] = torch.tensor([True, False, True, False, False, True])
    mixed = model.fuse(z, present, orders=[("a", "b", "c")]).logits
    without_b = model.fuse(z, present, modalities=["a", "c"], orders=[("a", "c")]).logits
    with_b = model.fuse(z, all_present(), orders=[("a", "b", "c")]).logits
    missing = ~present["b"]
    torch.testing.assert_close(mixed[missing], without_b[missing])
    torch.testing.assert_close(mixed[~missing], with_b[~missing])
    # and the chain really depends on b where b is present
    assert not torch.allclose(with_b, without_b)


def test_first_present_modality_starts_the_chain():
    model = make_model()
    z = features()
    present = all_present()
    present["a"] = torch.zeros(6, dtype=torch.bool)
    out = model.fuse(z, present, orders=[("a", "b", "c")]).logits
    ref = model.fuse(z, all_present(), modalities=["b", "c"], orders=[("b", "c")]).logits
    torch.testing.assert_close(out, ref)


def test_single_modality_chain_is_its_feature():
    model = make_model()
    z = features()
    out = model.fuse(z, all_present(), modalities=["b"]).logits
    torch.testing.assert_close(out, model.fusion.head(z["b"]))


def test_hybrid_order_equals_mean_of_single_order_states():
    model = make_model()
    z = features()
    orders = list(itertools.permutations(NAMES))
    hybrid = model.fuse(z, all_present(), orders=orders).fused
    single = torch.stack([model.fuse(z, all_present(), orders=[o]).fused for o in orders]).mean(0)
    torch.testing.assert_close(hybrid, single)
    # the order matters for single orders (otherwise the test would be vacuous)
    first = model.fuse(z, all_present(), orders=[orders[0]]).fused
    last = model.fuse(z, all_present(), orders=[orders[-1]]).fused
    assert not torch.allclose(first, last)


def test_coalition_with_induced_orders_equals_masked_full_orders():
    model = make_model()
    z = features()
    orders = list(itertools.permutations(NAMES))
    subset = ["a", "c"]
    fast = model.fuse(z, all_present(), modalities=subset, orders=orders).fused
    masked = all_present()
    masked["b"] = torch.zeros(6, dtype=torch.bool)
    slow = torch.stack([model.fuse(z, masked, orders=[o]).fused for o in orders]).mean(0)
    torch.testing.assert_close(fast, slow)


def test_induce_orders_counts_multiplicities():
    orders = list(itertools.permutations("abc"))
    induced, weights = induce_orders(orders, ["a", "c"])
    assert sorted(induced) == [("a", "c"), ("c", "a")]
    assert weights == [3.0, 3.0]


def test_alignment_loss_per_step_and_gradients_reach_learned_map():
    model = make_model().train()
    b = 16
    batch = MultimodalBatch(
        inputs={n: torch.randn(b, d) for n, d in zip(NAMES, (5, 7, 3), strict=True)},
        present={n: torch.ones(b, dtype=torch.bool) for n in NAMES},
        labels=torch.randint(0, 4, (b,)),
        indices=torch.arange(b),
    )
    out = model(batch, orders=[NAMES], align_loss=True)
    assert len(out.aux_losses) == 3
    assert out.aux_losses[0] is None  # the first step has nothing to align
    loss = out.logits.sum() + sum(x for x in out.aux_losses if x is not None)
    loss.backward()
    mem = model.fusion.memory
    assert mem.learned_map(0, 1)[0].grad.abs().sum() > 0
    assert mem.learned_map(1, 2)[0].grad.abs().sum() > 0
    # pair (c -> a) is not read by order a, b, c: no gradient at all (the optimizer skips it)
    assert all(p.grad is None for p in mem.learned_map(2, 0))


def test_correlation_statistic_is_row_normalised_and_tracked():
    memory = CrossModalMemory(2, 4, align_learned=False, stat_momentum=0.5).train()
    z = torch.randn(32, 2, 4)
    corr = batch_cross_correlation(z[:, 0], z[:, 1])
    torch.testing.assert_close(corr.abs().sum(1), torch.ones(4), atol=1e-4, rtol=0)
    present = torch.ones(32, 2, dtype=torch.bool)
    memory(z, present, torch.tensor([[0, 1]]))
    expected = 0.5 * torch.eye(4) + 0.5 * corr
    torch.testing.assert_close(memory.corr_ema[0, 1], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(memory.corr_ema[1, 0], torch.eye(4))  # unused pair untouched


@pytest.mark.parametrize("fusion", ["concat", "sum", "late"])
def test_unimodal_logits_sum_to_output_for_additive_fusions(fusion):
    model = make_model(fusion)
    z = features()
    out = model.fuse(z, all_present()).logits
    parts = model.fusion.unimodal_logits(z)
    total = sum(parts.values())
    if fusion == "late":
        total = total / len(NAMES)
    torch.testing.assert_close(out, total)


def test_unknown_modality_is_named():
    model = make_model()
    with pytest.raises(KeyError, match="'zz'"):
        model.fuse(features(), all_present(), modalities=["zz"])


def test_blocked_evaluation_path_equals_the_per_pair_path():
    model = make_model()
    z = features(b=5)
    orders = list(itertools.permutations(NAMES))
    fast = model.fuse(z, all_present(5), orders=orders).fused  # all present: batched path
    present = all_present(5)
    present["c"] = torch.tensor([True, True, True, True, False])  # forces the per-pair path
    slow = model.fuse(z, present, orders=orders).fused
    torch.testing.assert_close(fast[:4], slow[:4])


# ------------------------------------------------------------------ once per batch
def _trained_setup(strategy: str, m: int = 5, optimizer=None, dropout: float = 0.0):
    """A memory model over ``m`` synthetic modalities, its strategy set up on one batch."""
    from equimodal.config import build_config
    from equimodal.data.registry import load_dataset
    from equimodal.engine.build import build_model
    from equimodal.strategies import TrainContext, build_strategy

    config = build_config(
        {},
        [
            "dataset.name=synthetic",
            f"dataset.options={{num_samples: 300, num_classes: 3, num_modalities: {m}}}",
            f"strategy.name={strategy}",
            "model.fusion=memory",
            "model.dim=8",
            "model.encoder.hidden=16",
            f"model.encoder.dropout={dropout}",
            "train.relative_edm=false",
        ],
    )
    data = load_dataset("synthetic", seed=0, **config.dataset.options)
    torch.manual_seed(0)
    model = build_model(config, data.info).train()
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        optimizer = optimizer(model.parameters())
    strat = build_strategy(config.strategy)
    strat.setup(TrainContext(model, optimizer, data.modalities, data.num_classes, seed=0))
    return model, strat, data


def _record_first_features(model) -> dict[str, torch.Tensor]:
    """Spy on ``encode_modality``: each modality's first features (what the memory reads)."""
    seen: dict[str, torch.Tensor] = {}
    original = model.encode_modality

    def spy(modality, x):
        z = original(modality, x)
        seen.setdefault(modality, z.detach().clone())
        return z

    model.encode_modality = spy
    return seen


def _assert_one_update_along(model, order, features, momentum: float = 0.9) -> None:
    """Each consecutive pair of ``order`` moved once from its batch statistic; no other."""
    mem = model.fusion.memory
    index = {m: k for k, m in enumerate(model.modalities)}
    chain = {(index[a], index[b]) for a, b in itertools.pairwise(order)}
    d = mem.dim
    for i, j in itertools.product(range(len(model.modalities)), repeat=2):
        if (i, j) in chain:
            assert int(mem.stat_updates[i, j]) == 1, (i, j, mem.stat_updates)
            names = model.modalities
            corr = batch_cross_correlation(features[names[i]], features[names[j]])
            expected = momentum * torch.eye(d) + (1 - momentum) * corr
            torch.testing.assert_close(mem.corr_ema[i, j], expected, atol=1e-6, rtol=0)
        else:
            assert int(mem.stat_updates[i, j]) == 0, (i, j)
            assert torch.equal(mem.corr_ema[i, j], torch.eye(d))


def test_alternating_batch_moves_each_pairs_moving_average_once():
    """shapley_alternating runs the chain M times per batch (every prefix of the order);
    each pair's moving average still moves once, by one momentum-0.9 step from the batch
    statistic of the features the chain read (before: the first pair moved M - 1 times)."""
    model, strat, data = _trained_setup("shapley_alternating", m=5, dropout=0.1)
    strat.order = ("m3", "m0", "m4", "m1", "m2")
    strat.on_epoch_start(1)
    features = _record_first_features(model)
    strat.training_step(next(data.train.batches(64)))
    _assert_one_update_along(model, strat.epoch_order, features)
    # the next batch moves each of these pairs once more
    model.fusion.memory.stat_updates.zero_()
    strat.training_step(next(data.train.batches(64, shuffle=True)))
    chain = [model.modalities.index(m) for m in strat.epoch_order]
    for i, j in itertools.pairwise(chain):
        assert int(model.fusion.memory.stat_updates[i, j]) == 1


def test_joint_memory_batch_moves_each_pairs_moving_average_once():
    model, strat, data = _trained_setup("joint", m=4, dropout=0.1)
    features = _record_first_features(model)
    strat.training_step(next(data.train.batches(64)))
    _assert_one_update_along(model, model.modalities, features)


def test_several_orders_in_one_call_move_a_shared_pair_once():
    """Pair (0 -> 1) is read at step 1 of one order and step 2 of the other: one update;
    a second batch (other features) is a second update."""
    memory = CrossModalMemory(3, 4, align_learned=False).train()
    present = torch.ones(32, 3, dtype=torch.bool)
    orders = torch.tensor([[0, 1, 2], [2, 0, 1]])
    z1, z2 = torch.randn(32, 3, 4), torch.randn(32, 3, 4)
    memory(z1, present, orders)
    memory(z1, present, orders[:1])  # the same batch again (another prefix, say)
    assert memory.stat_updates.tolist() == [[0, 1, 0], [0, 0, 1], [1, 0, 0]]
    memory(z2, present, orders)
    assert memory.stat_updates.tolist() == [[0, 2, 0], [0, 0, 2], [2, 0, 0]]
    c1 = batch_cross_correlation(z1[:, 0], z1[:, 1])
    c2 = batch_cross_correlation(z2[:, 0], z2[:, 1])
    expected = 0.81 * torch.eye(4) + 0.09 * c1 + 0.1 * c2
    torch.testing.assert_close(memory.corr_ema[0, 1], expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ no gradient, no move
def _adamw(**impl):
    def make(params):
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **impl)

    return make


@pytest.mark.parametrize(
    "impl",
    [{"foreach": False}, {"foreach": True}, {"fused": True}],
    ids=["loop", "foreach", "fused"],
)
def test_a_pair_no_step_reads_does_not_move(impl):
    """AdamW with weight decay, dropout in the encoders: after a first batch every pair of
    the order has momentum; in the second batch, step k reads only the pairs of the prefix
    pi_1..pi_k, and every other pair (no gradient) stays bit-identical."""
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], **impl)
    except (RuntimeError, ValueError, TypeError):
        pytest.skip(f"this torch has no AdamW {impl}")
    model, strat, data = _trained_setup(
        "shapley_alternating", m=4, optimizer=_adamw(**impl), dropout=0.2
    )
    assert any(isinstance(x, torch.nn.Dropout) and x.p == 0.2 for x in model.modules())
    mem = model.fusion.memory
    strat.order = ("m2", "m0", "m3", "m1")
    strat.on_epoch_start(1)
    batches = data.train.batches(64, shuffle=True, generator=torch.Generator().manual_seed(0))
    strat.training_step(next(batches))  # momentum on every pair of the order
    index = [model.modalities.index(m) for m in strat.epoch_order]
    all_pairs = list(itertools.product(range(4), repeat=2))
    checked = []
    original = strat.context.optimizer_step

    def spy(loss, modify_gradients=None):
        k = len(checked)
        read = set(itertools.pairwise(index[: k + 1]))
        before = {p: [t.detach().clone() for t in mem.learned_map(*p)] for p in all_pairs}
        original(loss, modify_gradients)
        for p in all_pairs:
            now = mem.learned_map(*p)
            if p in read:
                assert now[0].grad is not None
                assert not torch.equal(now[0], before[p][0]), p  # it did train
            else:
                assert all(t.grad is None for t in now), p
                assert all(torch.equal(a, b) for a, b in zip(now, before[p], strict=True)), p
        checked.append(k)

    strat.context.optimizer_step = spy
    strat.training_step(next(batches))
    assert len(checked) == 4


# ------------------------------------------------------------------ old checkpoints
def _reference_state(mem, weight, bias, z, order):
    """The chain as the packed layout defined it: ``h (C_ij + W[i, j]) + B[i, j]``."""
    h = z[:, order[0]]
    for i, j in itertools.pairwise(order):
        aligned = h @ (mem.corr_ema[i, j] + weight[i, j]) + bias[i, j]
        x = z[:, j]
        forget, inp, out = torch.sigmoid(mem.gates(torch.cat([x, aligned], -1))).chunk(3, -1)
        h = out * torch.tanh(forget * x + inp * torch.tanh(mem.candidate(aligned)))
    return h


def test_old_packed_checkpoint_loads_and_gives_the_same_outputs():
    """A state dict with the packed ``map_weight`` ``(M, M, d, d)`` / ``map_bias`` (every
    checkpoint before per-pair parameters) loads through the checkpoint loader and gives
    the outputs those packed maps define, on the chain, stacked-orders and tree paths."""
    from equimodal.engine.checkpoint import load_model_state

    old = make_model(seed=3).state_dict()
    prefix = "fusion.memory."
    assert not any(".pair_" in k for k in old)  # the layout checkpoints always had
    g = torch.Generator().manual_seed(5)
    weight = 0.3 * torch.randn(old[prefix + "map_weight"].shape, generator=g)
    bias = 0.3 * torch.randn(old[prefix + "map_bias"].shape, generator=g)
    assert weight.shape == (3, 3, 8, 8) and bias.shape == (3, 3, 8)
    old[prefix + "map_weight"], old[prefix + "map_bias"] = weight, bias
    old[prefix + "corr_ema"] = old[prefix + "corr_ema"] + 0.1 * torch.randn(
        old[prefix + "corr_ema"].shape, generator=g
    )
    model = make_model(seed=0)
    load_model_state(model, dict(old), "old.safetensors")
    mem = model.fusion.memory
    torch.testing.assert_close(mem.learned_map(2, 1)[0], weight[2, 1], atol=0, rtol=0)
    z = features(b=40)
    stacked = torch.stack([z[n] for n in NAMES], dim=1)
    orders = list(itertools.permutations(range(3)))
    with torch.no_grad():
        refs = [_reference_state(mem, weight, bias, stacked, o) for o in orders]
        single = model.fuse(z, all_present(40), orders=[tuple(NAMES[i] for i in orders[3])])
        torch.testing.assert_close(single.fused, refs[3], atol=1e-5, rtol=0)
        named = [tuple(NAMES[i] for i in o) for o in orders]
        model.fusion.tree_min_work = float("inf")  # orders stacked on the batch axis
        blocked = model.fuse(z, all_present(40), orders=named).fused
        model.fusion.tree_min_work = 0  # the prefix tree
        tree = model.fuse(z, all_present(40), orders=named).fused
    hybrid = torch.stack(refs).mean(0)
    torch.testing.assert_close(blocked, hybrid, atol=1e-5, rtol=0)
    torch.testing.assert_close(tree, hybrid, atol=1e-5, rtol=0)
    # and the model writes the same layout back: old and new checkpoints are one format
    again = model.state_dict()
    assert list(again) == list(old)
    assert torch.equal(again[prefix + "map_weight"], weight)


def test_packed_maps_of_the_wrong_shape_are_named():
    model = make_model()
    state = model.state_dict()
    state["fusion.memory.map_weight"] = torch.zeros(2, 2, 8, 8)
    with pytest.raises(RuntimeError, match="map_weight"):
        model.load_state_dict(state)
