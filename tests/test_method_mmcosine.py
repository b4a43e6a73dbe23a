"""MMCosine (Xu et al., ICASSP 2023): the cosine logits recomputed by hand.

The official code (github.com/GeWu-Lab/MMCosine_ICASSP23, ``train_epoch`` of
``main_CD.py``): ``out_m = mm(normalize(z_m, dim=1), normalize(W_m^T, dim=0)) * scaling``
with ``W_m`` modality ``m``'s columns of the concatenation head, ``out = sum_m out_m``,
``CE(out, y)``; no bias.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import equimodal.strategies.mmcosine  # noqa: F401  (registers the strategy)
from equimodal.data.batch import MultimodalBatch
from equimodal.data.registry import load_dataset
from equimodal.engine.trainer import Trainer
from equimodal.engine.validation import encode_split
from equimodal.models.fusion import ConcatFusion, FusionOutput, LateFusion
from equimodal.strategies.mmcosine import cosine_logits, fused_cosine_logits

from .method_kit import method_config
from .method_kit import set_up as setup_strategy


def config_for(modalities: int = 3, epochs: int = 3, extra=()):
    return method_config("mmcosine", modalities, epochs, extra)


def cosine_by_hand(z: torch.Tensor, w: torch.Tensor, s: float) -> torch.Tensor:
    """``s * <z_i, w_c> / (||z_i|| ||w_c||)``, one entry at a time."""
    return torch.stack(
        [torch.stack([s * torch.dot(a, c) / (a.norm() * c.norm()) for c in w]) for a in z]
    )


def weight_blocks_by_hand(model) -> dict[str, torch.Tensor]:
    """The official ``fc_out.weight[:, k d:(k+1) d]`` (concat) or each modality's head."""
    if model.fusion_name == "late":
        return {m: model.head_weight(m) for m in model.modalities}
    w, d = model.head_weight(), model.dim
    return {m: w[:, k * d : (k + 1) * d] for k, m in enumerate(model.modalities)}


def test_cosine_logits_by_hand_and_invariant_to_norms():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    got = cosine_logits(z, w, 10.0)
    torch.testing.assert_close(got, cosine_by_hand(z, w, 10.0))
    # the official form: normalize(W^T, dim=0) is each class row normalised
    official = F.normalize(z, dim=1) @ F.normalize(w.T, dim=0) * 10.0
    torch.testing.assert_close(got, official)
    for c in (1e-3, 0.5, 40.0):  # a feature's norm does not change its logits
        torch.testing.assert_close(cosine_logits(c * z, w, 10.0), got)
    rows = torch.tensor([0.1, 3.0, 25.0], dtype=torch.float64)[:, None]
    torch.testing.assert_close(cosine_logits(z, rows * w, 10.0), got)  # nor a class row's
    assert float(got.abs().max()) <= 10.0 + 1e-12
    torch.testing.assert_close(cosine_logits(z, w, 15.0), 1.5 * got)  # linear in s


@pytest.mark.parametrize("modalities, fusion", [(2, "concat"), (3, "concat"), (3, "late")])
def test_training_step_is_the_official_loss_with_dropout_on(modalities, fusion):
    extra = ["model.encoder.dropout=0.3", f"model.fusion={fusion}", "strategy.scaling=15"]
    data, model, strategy = setup_strategy(config_for(modalities, extra=extra))
    it = data.train.batches(32)
    for t in range(2):
        batch = next(it)
        torch.manual_seed(700 + t)
        model.train()
        z = model.encode(batch)
        blocks = weight_blocks_by_hand(model)
        out = {m: cosine_by_hand(z[m], blocks[m], 15.0) for m in model.modalities}
        loss = F.cross_entropy(sum(out.values()), batch.labels)
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.manual_seed(700 + t)
        logs = strategy.training_step(batch)
        assert logs["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
        for m in model.modalities:
            own = F.cross_entropy(out[m], batch.labels)
            assert logs[f"loss_{m}"] == pytest.approx(float(own.detach()), rel=1e-5)
        for name, p in model.named_parameters():
            if name in grads:
                torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-4)
            else:
                assert p.grad is None, name
        # no bias in the cosine logits: the head's bias gets no gradient
        for p in model.head_parameters():
            if p.ndim == 1:
                assert p.grad is None


def test_rows_missing_a_modality_sum_only_the_present_ones():
    data, model, strategy = setup_strategy(config_for(3, extra=["model.encoder.dropout=0"]))
    batch = next(data.train.batches(16))
    present = {m: p.clone() for m, p in batch.present.items()}
    present["m1"][:5] = False
    present["m2"][3:8] = False
    batch = MultimodalBatch(batch.inputs, present, batch.labels, batch.indices)
    with torch.no_grad():
        z = model.encode(batch)
        blocks = weight_blocks_by_hand(model)
        fused, _ = fused_cosine_logits(z, present, model.decision_weights(), 10.0)
    for i in range(len(batch)):
        want = sum(
            cosine_by_hand(z[m][i : i + 1], blocks[m], 10.0)[0]
            for m in model.modalities
            if present[m][i]
        )
        torch.testing.assert_close(fused[i], want, atol=1e-5, rtol=1e-5)
    logs = strategy.training_step(batch)
    assert logs["loss"] == pytest.approx(float(F.cross_entropy(fused, batch.labels)), rel=1e-5)


def test_sum_and_shared_fusions_are_refused():
    for fusion in ("sum", "shared", "memory"):
        with pytest.raises(ValueError, match="mmcosine"):
            config_for(2, extra=[f"model.fusion={fusion}"])


@pytest.mark.parametrize("fusion", ["concat", "late"])
def test_inference_asks_for_cosine_logits_exactly_when_the_fusion_gives_them(fusion):
    data, model, strategy = setup_strategy(config_for(3, extra=[f"model.fusion={fusion}"]))
    batch = next(data.train.batches(16))
    model.eval()
    with torch.no_grad():
        z = model.encode(batch)
        plain = model.fuse(z, batch.present).logits
        predicted = model.fuse(z, batch.present, **strategy.inference_kwargs()).logits
        cosine, _ = fused_cosine_logits(z, batch.present, model.decision_weights(), 10.0)
    if strategy.cosine_inference:  # the fusion takes ``cosine_scale``: the method's logits
        assert strategy.inference_kwargs() == {"fusion_kwargs": {"cosine_scale": 10.0}}
        torch.testing.assert_close(predicted, cosine, atol=1e-5, rtol=1e-5)
    else:  # today's fusions: the model's own head predicts
        assert strategy.inference_kwargs() == {}
        torch.testing.assert_close(predicted, plain)
        assert (plain - cosine).abs().max() > 1e-3


def cosine_forward(original):
    """The fusion option proposed for ``models/fusion.py``: ``cosine_scale`` replaces the
    head by the sum over present modalities of ``s * cos(z_m, W_m[c])``."""

    def forward(self, z, present, orders=None, weights=None, align_loss=False, cosine_scale=None):
        if cosine_scale is None:
            return original(self, z, present, orders, weights, align_loss)
        blocks = self.decision_weights()
        ref = next(iter(z.values()))
        logits = ref.new_zeros(ref.shape[0], self.num_classes)
        for m, v in z.items():
            cos = F.normalize(v, dim=1) @ F.normalize(blocks[m], dim=1).T
            logits = logits + cosine_scale * cos * present[m].unsqueeze(1).to(v.dtype)
        return FusionOutput(logits=logits, fused=logits, aux_losses=[])

    return forward


@pytest.mark.parametrize("fusion", ["concat", "late"])
def test_with_a_cosine_fusion_option_validation_and_test_use_cosine_logits(fusion, monkeypatch):
    for cls in (ConcatFusion, LateFusion):
        monkeypatch.setattr(cls, "forward", cosine_forward(cls.forward))
    config = config_for(2, epochs=2, extra=[f"model.fusion={fusion}"])
    result = Trainer(config, progress=False).fit()
    assert result.metrics["inference"] == {"fusion_kwargs": {"cosine_scale": 10.0}}
    data = load_dataset(config.dataset.name, seed=config.seed, **config.dataset.options)
    cache = encode_split(result.model, data.split("test"))
    with torch.no_grad():
        logits, _ = fused_cosine_logits(
            cache.z, cache.present, result.model.decision_weights(), 10.0
        )
    accuracy = float((logits.argmax(1) == cache.labels).float().mean())
    assert result.metrics["test"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_mmcosine_trains_and_survives_missing_rows(small_config):
    result = Trainer(small_config("mmcosine", epochs=4), progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.8
    missing = small_config("mmcosine", epochs=3, extra=["train.missing_rate=0.3"])
    result = Trainer(missing, progress=False).fit()
    assert all(math.isfinite(v) for v in result.history[-1]["train"].values())
    assert result.metrics["test"]["accuracy"] > 0.6
