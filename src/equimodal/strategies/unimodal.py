"""``unimodal``: train and predict from one named modality alone.

Gives each modality's stand-alone ability (the reference shares of relative EDM). The
model keeps all encoders, but only the named one is read and trained; the fusion sees a
coalition of one (concat: zeros in the other blocks; memory: ``g(z_m)``).
"""

from __future__ import annotations

from typing import Any, Literal

from equimodal.config import StrategyConfig
from equimodal.data.batch import MultimodalBatch
from equimodal.strategies.base import (
    Strategy,
    TrainContext,
    masked_cross_entropy,
    register_strategy,
)


class UnimodalConfig(StrategyConfig):
    """Options of ``unimodal``: ``modality`` names the one modality to use."""

    name: Literal["unimodal"] = "unimodal"
    modality: str


@register_strategy
class UnimodalStrategy(Strategy):
    """One modality alone: ``CE(g(z_m), y)``."""

    name = "unimodal"
    measures_relative_edm = False
    config_class = UnimodalConfig
    default_fusion = "concat"
    supports_distributed = True
    config: UnimodalConfig

    def setup(self, ctx: TrainContext) -> None:
        if self.config.modality not in ctx.modalities:
            raise ValueError(
                f"strategy unimodal: modality {self.config.modality!r} is not in the dataset "
                f"(it has {', '.join(ctx.modalities)})"
            )
        super().setup(ctx)

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        m = self.config.modality
        out = ctx.model(batch, modalities=[m])
        loss = masked_cross_entropy(out.logits, batch.labels, batch.present[m])
        ctx.optimizer_step(loss)
        return {"loss": float(loss.detach())}

    def inference_kwargs(self) -> dict[str, Any]:
        return {"modalities": [self.config.modality]}
