"""Shared fixtures: small, fast configurations on synthetic data."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


def small_overrides(strategy: str = "shapley_alternating", epochs: int = 3) -> list[str]:
    """A config small enough to train in a second or two on CPU."""
    return [
        "dataset.name=synthetic",
        "dataset.options={num_samples: 600, num_classes: 4, signal: [3.0, 1.5, 0.4]}",
        f"strategy.name={strategy}",
        f"train.epochs={epochs}",
        "train.batch_size=64",
        "model.dim=16",
        "model.encoder.hidden=32",
        "optim.lr=0.01",
        "train.relative_edm=false",
    ]


@pytest.fixture
def small_config():
    from equimodal.config import build_config

    def make(
        strategy: str = "shapley_alternating", epochs: int = 3, extra: list[str] | None = None
    ):
        return build_config({}, small_overrides(strategy, epochs) + list(extra or []))

    return make
