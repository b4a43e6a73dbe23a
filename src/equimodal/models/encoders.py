"""Per-modality encoders and the registry that builds them from config."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from equimodal.data.base import ModalitySpec

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}


class MLPEncoder(nn.Module):
    """A multilayer perceptron over a flat feature vector.

    ``depth`` hidden layers of width ``hidden`` (Linear, activation, dropout); the output
    feature has ``out_dim == hidden`` entries.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int = 256,
        depth: int = 1,
        dropout: float = 0.1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if in_dim <= 0 or hidden <= 0 or depth <= 0:
            raise ValueError(
                f"MLPEncoder needs positive sizes, got in_dim={in_dim}, hidden={hidden}, "
                f"depth={depth}"
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {list(_ACTIVATIONS)}"
            )
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), _ACTIVATIONS[activation](), nn.Dropout(dropout)]
            width = hidden
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``x`` of shape ``(B, in_dim)`` (other shapes flattened) to ``(B, out_dim)``."""
        return self.net(x.reshape(x.shape[0], -1))


ENCODER_NAMES = ("mlp",)


def build_encoder(spec: ModalitySpec, kind: str, **options: object) -> nn.Module:
    """Build the encoder ``kind`` for modality ``spec``; the module exposes ``out_dim``."""
    if kind == "mlp":
        return MLPEncoder(spec.dim, **options)  # type: ignore[arg-type]
    raise ValueError(
        f"unknown encoder {kind!r} for modality {spec.name!r}; choose one of {ENCODER_NAMES}"
    )
