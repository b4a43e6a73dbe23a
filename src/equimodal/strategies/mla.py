"""``mla``: multimodal learning with alternating unimodal adaptation (Zhang et al., CVPR
2024; METHODS.md §2.4).

A head shared by all modalities (fusion ``shared``) is trained in per-batch unimodal steps,
modalities in a fixed order. To keep the head from forgetting one modality while it learns
another, the gradient of its weight is projected (orthogonal weight modification):
each modality ``m`` has a projector ``P_m`` built from the batch-mean features ``r`` of the
*other* modalities, ``k = P r``, ``P <- P - k k^T / (alpha + r^T k)``, and in ``m``'s step
``grad_W <- grad_W P_m^T``, so the head's response to the stored feature directions barely
moves. At test time the modalities' logits are fused with per-sample weights
``exp(max_k e_k - e_m)`` normalised, ``e_m`` the entropy of modality ``m``'s prediction.

Notes: the public MLA code never runs its projection (a parameter-name check never
matches) and computes the entropy over the batch axis; equimodal implements the paper's
reading. One projector per modality, built from the others' features, is our
generalisation to any number of modalities (for two it is the paper's scheme).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from equimodal.config import StrategyConfig
from equimodal.data.batch import MultimodalBatch
from equimodal.strategies.base import (
    Strategy,
    TrainContext,
    masked_cross_entropy,
    register_strategy,
)


class MLAConfig(StrategyConfig):
    """Options of ``mla``."""

    name: Literal["mla"] = "mla"
    projection: bool = True
    projection_alpha: float = Field(1.0, gt=0.0)
    test_fusion: Literal["entropy", "mean"] = "entropy"


@register_strategy
class MLAStrategy(Strategy):
    """Alternating unimodal steps on a shared head with gradient projection; see module doc."""

    name = "mla"
    config_class = MLAConfig
    default_fusion = "shared"
    fusions = ("shared",)
    supports_distributed = True
    config: MLAConfig

    def __init__(self, config: MLAConfig) -> None:
        super().__init__(config)
        self.projectors: dict[str, torch.Tensor] = {}

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        dim = ctx.model.dim
        device = ctx.model.head_weight().device
        if not self.projectors:
            self.projectors = {m: torch.eye(dim, device=device) for m in ctx.modalities}

    def inference_kwargs(self) -> dict[str, Any]:
        """Test-time fusion of the shared head's per-modality logits (entropy or mean)."""
        return {"fusion_kwargs": {"combine": self.config.test_fusion}}

    def remember(self, modality: str, features: torch.Tensor) -> None:
        """Add the batch-mean feature of ``modality`` to every other modality's projector."""
        r = self.context.row_mean(features.detach())  # of the global batch under torchrun
        for other, p in self.projectors.items():
            if other == modality:
                continue
            k = p @ r
            self.projectors[other] = p - torch.outer(k, k) / (self.config.projection_alpha + r @ k)

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        weight = ctx.model.head_weight()
        logs: dict[str, float] = {}
        losses = []
        for m in ctx.modalities:
            rows = batch.present[m]
            if not ctx.global_any(rows):
                continue
            z = ctx.model.encode_modality(m, batch.inputs[m])
            loss = masked_cross_entropy(ctx.model.modality_logits(m, z), batch.labels, rows)

            def project(m: str = m) -> None:
                if self.config.projection and weight.grad is not None:
                    weight.grad.copy_(weight.grad @ self.projectors[m].T)

            ctx.optimizer_step(loss, project)
            if self.config.projection:
                self.remember(m, z[rows])
            logs[f"loss_{m}"] = float(loss.detach())
            losses.append(logs[f"loss_{m}"])
        logs["loss"] = sum(losses) / max(len(losses), 1)
        return logs

    def state_dict(self) -> dict[str, Any]:
        return {"projectors": {m: p.cpu().tolist() for m, p in self.projectors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("projectors"):
            device = self.context.model.head_weight().device if self.ctx else "cpu"
            self.projectors = {
                m: torch.tensor(p, device=device) for m, p in state["projectors"].items()
            }
