"""Sequences of feature vectors, and the ``seq_transformer`` encoder over them.

**The sequence modality.** Utterance-level features (e.g. IEMOCAP's per-word GloVe
vectors, COVAREP audio frames, Facet face features) are a sequence ``(T, d)`` per sample,
padded to a common ``T``. A ``ModalitySpec`` of kind ``"sequence"`` has shape
``(T, d + 1)``: the feature columns, then **a last column that says which steps are
real** (1.0) and which are padding (0.0). Storing the mask inside the tensor keeps the
batch contract (one tensor per modality) and makes padding explicit: a real step whose
features happen to be all zeros is not mistaken for padding, and padded rows may hold
anything. :func:`to_sequence` builds such a tensor from features and a mask.

**The encoder** ``seq_transformer``: a linear map of the features to ``d_model``, fixed
sinusoidal positional encodings (step index), ``layers`` pre-norm transformer encoder
layers whose attention ignores padded steps (key padding mask), a final LayerNorm, and the
mean over the valid steps. Padded steps never influence the output. A sample without any
valid step (an absent modality, all zeros) reads its first step instead (no NaN).
``padding`` chooses how padding is found: ``mask_column`` (the default for kind
``"sequence"``), ``zero_rows`` (all-zero rows are padding, e.g. for MulT-style arrays
given directly as ``(T, d)``), or ``none`` (every step is real; the default for other
2-D modalities).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from equimodal.data.base import SEQUENCE_KIND, ModalitySpec
from equimodal.models.encoders import register_encoder


def to_sequence(features: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``(T, d + 1)`` float32: ``features`` ``(T, d)`` with the validity column appended.

    ``mask`` (``(T,)``, true = a real step) defaults to every step real. Padded steps are
    set to zero.
    """
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"a sequence must be (T, d), got shape {features.shape}")
    valid = np.ones(features.shape[0], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if valid.shape != (features.shape[0],):
        raise ValueError(f"mask of shape {valid.shape} does not fit a sequence of {features.shape}")
    out = np.zeros((features.shape[0], features.shape[1] + 1), dtype=np.float32)
    out[valid, :-1] = features[valid]
    out[:, -1] = valid
    return out


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """``(length, dim)`` sinusoidal positional encodings (Vaswani et al., 2017)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    scale = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * scale)
    table[:, 1::2] = torch.cos(position * scale[: dim // 2])
    return table


class SeqTransformerOptions(BaseModel):
    """Options of the ``seq_transformer`` encoder."""

    model_config = ConfigDict(extra="forbid")

    #: width of the transformer (the encoder's ``out_dim``)
    d_model: int = Field(64, gt=0)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    #: width of the feed-forward block (default 4 x d_model)
    ff_dim: int | None = Field(None, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    #: how padded steps are found (auto: mask_column for kind 'sequence', else none)
    padding: Literal["auto", "mask_column", "zero_rows", "none"] = "auto"


class SeqTransformer(nn.Module):
    """Transformer encoder over ``(B, T, C)`` sequences, mean-pooled over valid steps."""

    def __init__(
        self,
        in_dim: int,
        max_steps: int,
        d_model: int = 64,
        layers: int = 2,
        heads: int = 4,
        ff_dim: int | None = None,
        dropout: float = 0.1,
        padding: str = "mask_column",
    ) -> None:
        super().__init__()
        if in_dim <= 0 or max_steps <= 0:
            raise ValueError(
                f"seq_transformer needs in_dim > 0 and T > 0, got {in_dim}, {max_steps}"
            )
        if d_model % heads:
            raise ValueError(
                f"seq_transformer d_model ({d_model}) must be divisible by heads ({heads})"
            )
        if padding not in ("mask_column", "zero_rows", "none"):
            raise ValueError(f"unknown padding {padding!r}")
        self.in_dim = in_dim
        self.max_steps = max_steps
        self.padding = padding
        self.input = nn.Linear(in_dim, d_model)
        self.register_buffer(
            "positions", sinusoidal_positions(max_steps, d_model), persistent=False
        )
        layer = nn.TransformerEncoderLayer(
            d_model,
            heads,
            ff_dim or 4 * d_model,
            dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.out_dim = d_model

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (B, T, in_dim), valid (B, T) bool)`` of an input batch."""
        if x.dim() != 3:
            raise ValueError(
                f"seq_transformer takes (B, T, C) sequences, got shape {tuple(x.shape)}"
            )
        x = x.float()
        if self.padding == "mask_column":
            features, valid = x[..., :-1], x[..., -1] > 0.5
        elif self.padding == "zero_rows":
            features, valid = x, (x != 0).any(-1)
        else:
            features = x
            valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if features.shape[-1] != self.in_dim or features.shape[1] > self.max_steps:
            raise ValueError(
                f"seq_transformer was built for (T <= {self.max_steps}, {self.in_dim}) features, "
                f"got input of shape {tuple(x.shape)} (padding {self.padding!r})"
            )
        return features, valid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``(B, T, C)`` to ``(B, d_model)``; padded steps are ignored."""
        features, valid = self.split(x)
        empty = ~valid.any(1)
        if bool(empty.any()):  # no valid step: read the first one rather than produce NaN
            valid = valid.clone()
            valid[empty, 0] = True
        features = torch.where(valid.unsqueeze(-1), features, torch.zeros_like(features))
        h = self.input(features) + self.positions[: features.shape[1]]
        h = self.norm(self.encoder(h, src_key_padding_mask=~valid))
        weights = valid.unsqueeze(-1).to(h.dtype)
        return (h * weights).sum(1) / weights.sum(1)


@register_encoder(
    "seq_transformer",
    SeqTransformerOptions,
    "transformer encoder over (T, d) feature sequences, padding-aware mean pooling",
)
def build_seq_transformer(spec: ModalitySpec, **options: Any) -> SeqTransformer:
    """A :class:`SeqTransformer` for a ``(T, C)`` modality."""
    shape = tuple(spec.shape)
    if len(shape) != 2:
        raise ValueError(
            f"modality {spec.name!r}: seq_transformer reads sequences (T, d), got kind "
            f"{spec.kind!r} with shape {shape}"
        )
    padding = options.pop("padding", "auto")
    if padding == "auto":
        padding = "mask_column" if spec.kind == SEQUENCE_KIND else "none"
    in_dim = shape[1] - 1 if padding == "mask_column" else shape[1]
    if in_dim < 1:
        raise ValueError(f"modality {spec.name!r}: no feature columns besides the mask column")
    return SeqTransformer(in_dim, shape[0], padding=padding, **options)
