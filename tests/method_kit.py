"""Shared pieces of the per-method tests (``test_method_*.py``, ``test_fidelity.py``).

A small synthetic config for one strategy, that strategy set up on a fresh seeded model
(SGD with learning rate 0 by default, so a step's gradients can be compared with ones
computed by hand while the parameters stay put), and the first training batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from equimodal.config import build_config
from equimodal.data.batch import MultimodalBatch
from equimodal.data.registry import load_dataset
from equimodal.engine.trainer import build_model
from equimodal.strategies import TrainContext, build_strategy

from .conftest import small_overrides

#: per-modality signal strengths of the synthetic data: modality 0 dominates
SIGNALS = {2: "[3.0, 0.8]", 3: "[3.0, 1.5, 0.4]"}


def method_config(strategy: str, modalities: int = 3, epochs: int = 3, extra: Sequence[str] = ()):
    """``small_overrides`` for ``strategy`` on synthetic data with 2 or 3 modalities."""
    data = (
        f"dataset.options={{num_samples: 600, num_classes: 4, num_modalities: {modalities}, "
        f"signal: {SIGNALS[modalities]}}}"
    )
    return build_config({}, [*small_overrides(strategy, epochs), data, *extra])


def set_up(
    config,
    lr: float = 0.0,
    *,
    optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] | None = None,
) -> tuple[Any, torch.nn.Module, Any]:
    """Data, model (seed 0) and the config's strategy, set up with ``optimizer`` (a
    factory taking the parameters; SGD at ``lr`` by default)."""
    data = load_dataset(config.dataset.name, seed=0, **config.dataset.options)
    torch.manual_seed(0)
    model = build_model(config, data.info)
    make = optimizer or (lambda params: torch.optim.SGD(params, lr=lr))
    strategy = build_strategy(config.strategy)
    strategy.setup(
        TrainContext(model, make(model.parameters()), data.modalities, data.num_classes, seed=0)
    )
    return data, model, strategy


def first_batches(data, count: int, size: int = 64, start: int = 0) -> list[MultimodalBatch]:
    """Training batches ``start`` to ``start + count - 1`` of the first pass."""
    it = data.train.batches(size)
    return [next(it) for _ in range(start + count)][start:]
