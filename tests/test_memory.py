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
        with torch.no_grad():
            model.fusion.memory.map_weight.normal_(0, 0.3)
            model.fusion.memory.map_bias.normal_(0, 0.3)
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
    w = model.fusion.memory.map_weight.grad
    assert w[0, 1].abs().sum() > 0 and w[1, 2].abs().sum() > 0
    assert w[2, 0].abs().sum() == 0  # pair (c -> a) is not used by order a, b, c


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
