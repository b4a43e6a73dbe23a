"""train.precision (bf16 / fp16 autocast, fp16 gradient scaler) and train.channels_last."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import equimodal
from equimodal.config import build_config
from equimodal.core.registries import STRATEGIES
from equimodal.data.base import ModalitySpec
from equimodal.data.registry import load_dataset
from equimodal.engine.strategy import TrainContext
from equimodal.engine.trainer import Trainer
from equimodal.models.model import MultimodalModel


def _config(dataset: str, strategy: str, precision: str, epochs: int = 3, *extra: str):
    return build_config(
        {"dataset": {"name": dataset}},
        [
            f"strategy.name={strategy}",
            f"train.epochs={epochs}",
            "train.relative_edm=false",
            f"train.precision={precision}",
            "train.device=cpu",
            *extra,
        ],
    )


class DtypeSpy(nn.Module):
    """An MLP encoder that records the dtype of its output and the layout of its input."""

    out_dim = 16

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.linear = nn.Linear(4, 16)
        self.dropout = nn.Dropout(0.3)
        self.seen: list[tuple[bool, torch.dtype, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean((2, 3))
        out = self.dropout(self.linear(h))
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1
        self.seen.append((self.training, out.dtype, channels_last))
        return out


def _images(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    a = torch.randn(n, 2, 6, 6, generator=g) + y.view(-1, 1, 1, 1)
    b = torch.randn(n, 5, generator=g) + y.view(-1, 1) * 0.5
    return {"a": a, "b": b}, y


def test_bf16_autocasts_the_training_steps_and_never_validation():
    spy = DtypeSpy(2)
    equimodal.fit(
        _images(64, 0),
        _images(32, 1),
        _images(32, 2),
        encoders={"a": spy},
        strategy="shapley_alternating",
        epochs=2,
        batch_size=16,
        progress=False,
        overrides=["train.precision=bf16", "train.channels_last=true"],
    )
    training = {dtype for was_training, dtype, _ in spy.seen if was_training}
    evaluating = {dtype for was_training, dtype, _ in spy.seen[1:] if not was_training}
    assert training == {torch.bfloat16}
    assert evaluating == {torch.float32}  # validation, Shapley values and EDM: fp32
    assert all(cl for was_training, _, cl in spy.seen if was_training)  # channels-last input
    assert spy.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert spy.conv.weight.dtype == torch.float32  # the weights stay fp32


def test_channels_last_auto_leaves_cpu_runs_alone():
    spy = DtypeSpy(2)
    equimodal.fit(
        _images(32, 0),
        _images(16, 1),
        encoders={"a": spy},
        strategy="joint",
        epochs=1,
        batch_size=16,
        progress=False,
    )
    assert not any(cl for *_, cl in spy.seen)
    assert {dtype for _, dtype, _ in spy.seen} == {torch.float32}


def test_fp16_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = _config("synthetic", "joint", "fp16", 1)
    with pytest.raises(ValueError, match=r"fp16 needs a CUDA device.*use bf16 or fp32"):
        Trainer(cfg, progress=False).fit()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 training needs CUDA")
def test_fp16_trains_on_cuda():
    cfg = _config("synthetic", "shapley_alternating", "fp16", 2, "train.device=cuda")
    result = Trainer(cfg, progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.5


def test_the_gradient_scaler_hands_true_gradients_to_modulation_and_clipping():
    spec = ModalitySpec("x", (4,))
    results = {}
    for scaled in (False, True):
        torch.manual_seed(0)
        model = MultimodalModel([spec, ModalitySpec("y", (3,))], 2, dim=8)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaled else None
        ctx = TrainContext(model, optimizer, ("x", "y"), 2, seed=0, grad_clip=0.5, scaler=scaler)
        x = {"x": torch.randn(8, 4), "y": torch.randn(8, 3)}
        present = {m: torch.ones(8, dtype=torch.bool) for m in x}
        out = model(_batch(x, present))
        loss = nn.functional.cross_entropy(out.logits, torch.arange(8) % 2)
        seen: list[torch.Tensor] = []
        ctx.optimizer_step(loss, _record_head_gradient(model, seen))
        results[scaled] = (seen[0], [p.detach().clone() for p in model.parameters()])
    assert torch.allclose(results[True][0], results[False][0], rtol=1e-5, atol=1e-7)
    for a, b in zip(results[True][1], results[False][1], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def _record_head_gradient(model, seen):
    return lambda: seen.append(model.head_weight().grad.clone())


def _batch(x, present):
    from equimodal.data.batch import MultimodalBatch

    n = len(next(iter(x.values())))
    return MultimodalBatch(x, present, torch.arange(n) % 2, torch.arange(n))


@pytest.mark.parametrize("strategy", ["joint", "shapley_alternating"])
def test_bf16_accuracy_is_within_noise_of_fp32_on_mfeat(strategy):
    scores = {
        precision: Trainer(_config("mfeat", strategy, precision, 4), progress=False).fit()
        for precision in ("fp32", "bf16")
    }
    fp32 = scores["fp32"].metrics["test"]["accuracy"]
    bf16 = scores["bf16"].metrics["test"]["accuracy"]
    # the 10-seed standard deviation of either method on mfeat is about 0.3 points
    assert abs(fp32 - bf16) < 0.015, (fp32, bf16)
    assert scores["bf16"].metrics["test"]["shapley"]  # scored in fp32 like any run


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(set(STRATEGIES.names()) - {"unimodal"}))
def test_every_strategy_trains_in_bf16(strategy):
    result = Trainer(_config("synthetic", strategy, "bf16", 2), progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.4


def test_hybrid_order_inference_runs_under_autocast():
    from equimodal.engine.validation import encode_split, predict_coalition_logits

    data = load_dataset("synthetic", seed=0, num_modalities=4, num_samples=400)
    cfg = _config("synthetic", "shapley_alternating", "fp32", 1, "model.dim=8")
    result = Trainer(cfg, data=data, progress=False).fit()
    cache = encode_split(result.model, data.val)
    orders = result.strategy.inference_kwargs()["orders"]
    names = result.model.modalities
    coalitions = [names[:k] for k in range(1, len(names) + 1)]
    plain = predict_coalition_logits(result.model, cache, coalitions, orders=orders)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the order tree used to stop here
        under = predict_coalition_logits(result.model, cache, coalitions, orders=orders)
    assert len(orders) > 1
    for a, b in zip(plain, under, strict=True):  # bf16 rounding is all that differs
        assert torch.allclose(a, b.float(), atol=2e-2)
