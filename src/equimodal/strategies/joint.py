"""``joint``: one cross-entropy loss on the fused output, all modalities at once."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from equimodal.config import StrategyConfig
from equimodal.data.batch import MultimodalBatch
from equimodal.strategies.base import (
    Strategy,
    any_present,
    masked_cross_entropy,
    mean_or_zero,
    register_strategy,
)


class JointConfig(StrategyConfig):
    """Options of ``joint``."""

    name: Literal["joint"] = "joint"
    align_weight: float = Field(
        0.1, ge=0.0, description="memory fusion only: weight of the alignment loss"
    )


@register_strategy
class JointStrategy(Strategy):
    """Standard joint training: ``CE(fused logits, y)`` (+ the memory's alignment loss)."""

    name = "joint"
    config_class = JointConfig
    default_fusion = "concat"
    supports_distributed = True
    config: JointConfig

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        use_align = ctx.model.fusion_name == "memory" and self.config.align_weight > 0
        out = ctx.model(batch, align_loss=use_align)
        rows = any_present(batch.present)
        ce = masked_cross_entropy(out.logits, batch.labels, rows)
        loss = ce
        logs = {"loss": float(ce.detach())}
        if use_align:
            align = mean_or_zero(out.aux_losses, out.logits)
            loss = ce + self.config.align_weight * align
            logs["align"] = float(align.detach())
        ctx.optimizer_step(loss)
        return logs

    def inference_kwargs(self) -> dict[str, Any]:
        return {}
