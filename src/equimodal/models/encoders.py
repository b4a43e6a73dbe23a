"""Per-modality encoders and the registry that builds them from config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from equimodal.core.registries import ENCODERS
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


class MLPOptions(BaseModel):
    """Options of the ``mlp`` encoder."""

    model_config = ConfigDict(extra="forbid")

    hidden: int = Field(256, gt=0, le=65536)
    depth: int = Field(1, gt=0, le=64)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    activation: Literal["relu", "gelu", "tanh"] = "relu"


@dataclass(frozen=True)
class EncoderKind:
    """A registered encoder: its builder ``(spec, **options) -> module`` and options model."""

    name: str
    build: Callable[..., nn.Module]
    options: type[BaseModel]
    description: str = ""


def register_encoder(
    name: str, options: type[BaseModel], description: str = ""
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``build(spec, **options) -> nn.Module`` (with ``out_dim``)."""

    def decorate(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ENCODERS.add(name, EncoderKind(name, build, options, description), replace=True)
        return build

    return decorate


def encoder_names() -> list[str]:
    """Names of the registered encoder kinds."""
    return ENCODERS.names()


def get_encoder_kind(name: str) -> EncoderKind:
    """The registered encoder ``name``; ValueError naming the closest kind otherwise."""
    return ENCODERS.get(name)


@register_encoder("mlp", MLPOptions, "multilayer perceptron over a flat feature vector")
def _build_mlp(spec: ModalitySpec, **options: Any) -> nn.Module:
    if spec.kind == "text":  # UTF-8 bytes (equimodal.models.text), not features
        raise ValueError(
            f"modality {spec.name!r} holds text bytes; give it a text encoder "
            "(kind: text_bow or hf_text)"
        )
    return MLPEncoder(spec.dim, **options)


def build_encoder(spec: ModalitySpec, kind: str, **options: object) -> nn.Module:
    """Build the encoder ``kind`` for modality ``spec``; the module exposes ``out_dim``."""
    try:
        entry = get_encoder_kind(kind)
    except ValueError as err:
        raise ValueError(f"modality {spec.name!r}: {err}") from None
    checked = entry.options.model_validate(dict(options)).model_dump()
    return entry.build(spec, **checked)


class ModuleOptions(BaseModel):
    """Options of the ``module`` kind: which class the user's encoder was (for messages)."""

    model_config = ConfigDict(extra="forbid")

    #: ``package.module.ClassName`` of the module passed from Python
    cls: str = ""


#: the kind a config records for an encoder passed from Python as an ``nn.Module``
USER_MODULE_KIND = "module"


@register_encoder(
    USER_MODULE_KIND,
    ModuleOptions,
    "your own nn.Module, passed from Python (Trainer(encoders=...), equimodal.fit)",
)
def _build_user_module(spec: ModalitySpec, **options: Any) -> nn.Module:
    cls = options.get("cls") or "an nn.Module"
    raise ValueError(
        f"modality {spec.name!r} was trained with your own encoder ({cls}), passed from "
        f"Python; pass the same module again: load_run(RUN, encoders={{{spec.name!r}: "
        "module}) (the command line cannot rebuild it)"
    )
