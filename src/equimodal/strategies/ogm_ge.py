"""``ogm_ge``: on-the-fly gradient modulation with generalisation enhancement
(Peng et al., CVPR 2022; METHODS.md §2.4).

Each batch: ``s_m`` = sum over the batch of the softmax probability of the true class from
modality ``m``'s own logits; ``rho_m = s_m / mean_{k != m} s_k`` (for two modalities the
ratio of the paper). A modality with ``rho_m > 1`` dominates: its encoder gradients are
multiplied by ``k_m = 1 - tanh(alpha * rho_m)``; the others keep ``k = 1``. With ``noise``
(the GE part), every modality's encoder gradients also get Gaussian noise with the standard
deviation of that gradient. Modulation runs in epochs ``modulation_start..modulation_end``
(1-based, inclusive; by default the first half of a 100-epoch run).
Defined for any number of modalities through the mean of the others (our generalisation).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from equimodal.config import StrategyConfig
from equimodal.data.batch import MultimodalBatch
from equimodal.strategies.base import Strategy, masked_cross_entropy, register_strategy


class OGMGEConfig(StrategyConfig):
    """Options of ``ogm_ge``."""

    name: Literal["ogm_ge"] = "ogm_ge"
    alpha: float = Field(0.8, ge=0.0)
    modulation_start: int = Field(1, ge=1)
    modulation_end: int = Field(50, ge=0)
    noise: bool = True


def modulation_coefficients(
    true_class_prob: dict[str, torch.Tensor], alpha: float
) -> tuple[dict[str, float], dict[str, float]]:
    """``(rho_m, k_m)`` from each modality's true-class probabilities on a batch."""
    scores = {m: float(p.sum()) for m, p in true_class_prob.items()}
    ratios, coefficients = {}, {}
    for m, s in scores.items():
        others = [v for k, v in scores.items() if k != m]
        rho = s / max(sum(others) / len(others), 1e-12)
        ratios[m] = rho
        coefficients[m] = 1.0 - math.tanh(alpha * rho) if rho > 1 else 1.0
    return ratios, coefficients


@register_strategy
class OGMGEStrategy(Strategy):
    """Joint training whose dominant modality's encoder gradients are damped (OGM-GE)."""

    name = "ogm_ge"
    config_class = OGMGEConfig
    default_fusion = "concat"
    fusions = ("concat", "sum", "late")
    supports_distributed = True
    config: OGMGEConfig

    def __init__(self, config: OGMGEConfig) -> None:
        super().__init__(config)
        self.epoch = 0

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        out = ctx.model(batch, with_unimodal=True)
        rows = torch.zeros_like(batch.labels, dtype=torch.bool)
        for m in ctx.modalities:
            rows |= batch.present[m]
        loss = masked_cross_entropy(out.logits, batch.labels, rows)
        logs = {"loss": float(loss.detach())}
        cfg = self.config
        if not cfg.modulation_start <= self.epoch <= cfg.modulation_end:
            ctx.optimizer_step(loss)
            return logs
        with torch.no_grad():
            probs = {
                m: torch.softmax(z, 1).gather(1, batch.labels[:, None]).squeeze(1)
                * batch.present[m]
                for m, z in out.unimodal_logits.items()
            }
            if ctx.sharded:  # torchrun: s_m of the global batch
                probs = {m: ctx.global_sum(p.sum(0, keepdim=True)) for m, p in probs.items()}
        ratios, coefficients = modulation_coefficients(probs, cfg.alpha)

        def modulate() -> None:
            for m, k in coefficients.items():
                for p in ctx.model.modality_parameters(m):
                    if p.grad is None:
                        continue
                    std = float(p.grad.std()) if p.grad.numel() > 1 else 0.0
                    p.grad.mul_(k)
                    if cfg.noise:
                        p.grad.add_(torch.randn_like(p.grad) * (std + 1e-8))

        ctx.optimizer_step(loss, modulate)
        for m in ctx.modalities:
            logs[f"ratio_{m}"] = ratios[m]
            logs[f"coef_{m}"] = coefficients[m]
        return logs
