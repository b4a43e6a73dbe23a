"""``mmcosine``: multi-modal cosine loss (Xu, Feng, Zhang, Hu, ICASSP 2023).

Source: the official code (github.com/GeWu-Lab/MMCosine_ICASSP23, ``train_epoch`` and
``valid`` of ``main_CD.py``; ``main_vox2.py``) and BalanceBenchmark's port
(github.com/GeWu-Lab/BalanceBenchmark, ``balancemm/trainer/MMCosine_trainer.py``).

Each modality's logits are the cosines between its L2-normalised features and the
L2-normalised rows of its block of the classifier, times a scale ``s``:

    ``logits_m[c] = s * cos(z_m, W_m[c]) = s * <z_m, W_m[c]> / (||z_m|| ||W_m[c]||)``

(no bias), and the fused logits are their sum, ``sum_m logits_m``; the loss is the
cross-entropy of the fused logits. ``W_m`` is the ``(C, d)`` block of the classifier that
reads ``z_m``: modality ``m``'s columns of the concatenation head (fusion ``concat``, as
the official code) or modality ``m``'s own head (fusion ``late``, two separate heads as
the official ``SumFusion``), both from the model's ``decision_weights()``. The
normalisation makes every modality's logits live in ``[-s, s]`` whatever its feature and
weight norms, so no modality wins by growing them. Option: ``scaling`` ``s`` (10, the
official default; BalanceBenchmark uses 15).

**Inference.** The method predicts with the same cosine logits (BalanceBenchmark's
validation, the official ``main_vox2.py``). The model's forward cannot be changed by a
strategy: when the fusion accepts the call option ``cosine_scale`` (``fusion_kwargs``),
:meth:`MMCosineStrategy.inference_kwargs` asks for it and validation and test score the
cosine logits; otherwise the model predicts with its plain head, ``sum_m W_m z_m + b``,
which is what the official CREMA-D script's ``valid`` does (its ``prediction`` is the
model's ordinary output), but not the method as the paper and BalanceBenchmark define it.
``inference_kwargs`` (recorded in ``metrics.json``) says which one a run used.

Differences from the official code, and our choices:

- **Missing modalities** (ours): the fused logits sum the cosine logits of the modalities
  present in the row only (the official code has no missing modalities).
- **Any number of modalities**: the sum runs over all of them (BalanceBenchmark has the
  three-modality form); one modality is plain cosine softmax.
- No epoch window: the official ICASSP code uses the cosine logits in every epoch;
  BalanceBenchmark's ``modulation_starts/ends`` (0..80) falls back to the plain head
  outside it, which a 40-epoch equimodal run never reaches.
- The classifier's bias and the concatenation's missing-feature fill receive no gradient
  (as in the official code, where the bias is unused by the cosine logits).
- Model, optimizer and schedule are equimodal's (the run's config).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from equimodal.config import StrategyConfig
from equimodal.data.batch import MultimodalBatch
from equimodal.strategies.base import (
    Strategy,
    TrainContext,
    any_present,
    masked_cross_entropy,
    register_strategy,
)


class MMCosineConfig(StrategyConfig):
    """Options of ``mmcosine``."""

    name: Literal["mmcosine"] = "mmcosine"
    scaling: float = Field(
        10.0,
        gt=0.0,
        description="s: scale of the cosine logits (official: 10; BalanceBenchmark: 15)",
    )


def cosine_logits(z: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """``s * cos(z_i, W[c])``: ``(B, C)`` from features ``(B, d)`` and weights ``(C, d)``."""
    return scale * F.normalize(z, dim=1) @ F.normalize(weight, dim=1).T


def fused_cosine_logits(
    z: dict[str, torch.Tensor],
    present: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    scale: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The sum over each row's present modalities of ``s * cos(z_m, W_m[c])``, and the
    per-modality cosine logits."""
    unimodal = {m: cosine_logits(v, weights[m], scale) for m, v in z.items()}
    fused = None
    for m, logits in unimodal.items():
        term = logits * present[m].unsqueeze(1).to(logits.dtype)
        fused = term if fused is None else fused + term
    assert fused is not None
    return fused, unimodal


@register_strategy
class MMCosineStrategy(Strategy):
    """Joint training on the sum of the modalities' scaled cosine logits; see module doc."""

    name = "mmcosine"
    config_class = MMCosineConfig
    default_fusion = "concat"
    fusions = ("concat", "late")
    config: MMCosineConfig

    def __init__(self, config: MMCosineConfig) -> None:
        super().__init__(config)
        #: whether the model's fusion predicts with cosine logits (``cosine_scale``)
        self.cosine_inference = False

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self.cosine_inference = self._fusion_predicts_cosine()

    def _fusion_predicts_cosine(self) -> bool:
        """Probe ``model.fuse(..., fusion_kwargs={"cosine_scale": s})`` on one random row:
        True when the fusion accepts the option and returns the cosine logits."""
        model = self.context.model
        weight = next(iter(model.decision_weights().values()))
        g = torch.Generator().manual_seed(0)
        z = {
            m: torch.randn(2, model.dim, generator=g).to(weight.device, weight.dtype)
            for m in model.modalities
        }
        present = {m: torch.ones(2, dtype=torch.bool, device=weight.device) for m in z}
        scale = self.config.scaling
        with torch.no_grad():
            try:
                out = model.fuse(z, present, fusion_kwargs={"cosine_scale": scale}).logits
            except TypeError:
                return False
            want, _ = fused_cosine_logits(z, present, model.decision_weights(), scale)
        return bool(torch.allclose(out, want, atol=1e-5, rtol=1e-5))

    def inference_kwargs(self) -> dict[str, Any]:
        """The cosine logits when the fusion offers them (``cosine_scale``), else nothing."""
        if self.cosine_inference:
            return {"fusion_kwargs": {"cosine_scale": self.config.scaling}}
        return {}

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        z = ctx.model.encode(batch)
        fused, unimodal = fused_cosine_logits(
            z, batch.present, ctx.model.decision_weights(), self.config.scaling
        )
        rows = any_present(batch.present)
        loss = masked_cross_entropy(fused, batch.labels, rows)
        ctx.optimizer_step(loss)
        logs = {"loss": float(loss.detach())}
        with torch.no_grad():
            for m, logits in unimodal.items():
                own = masked_cross_entropy(logits, batch.labels, batch.present[m])
                logs[f"loss_{m}"] = float(own)
        return logs
