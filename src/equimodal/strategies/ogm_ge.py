"""``ogm_ge``: on-the-fly gradient modulation with generalisation enhancement
(Peng, Wei, Deng, Wang, Hu, *Balanced Multimodal Learning via On-the-fly Gradient
Modulation*, CVPR 2022; official code github.com/GeWu-Lab/OGM-GE_CVPR2022, ``train_epoch``
of ``main.py``).

Each batch, after the backward pass of the fused loss: ``s_m`` = sum over the batch of the
softmax probability of the true class from modality ``m``'s own logits (its block of the
head plus ``b / M``, the official ``fc_out.bias / 2``); ``rho_m = s_m / mean_{k != m} s_k``
(for two modalities the official ``score_v / score_a``). A modality with ``rho_m > 1``
dominates: the gradients of its encoder's weight tensors are multiplied by
``k_m = 1 - tanh(alpha * rho_m)``; the others keep ``k = 1``. With ``noise`` (the GE
part), every modality's modulated tensors also get Gaussian noise ``N(0, std(g) + 1e-8)``
with ``std`` the (unbiased) standard deviation of that gradient before scaling. Modulation
runs in epochs ``modulation_start..modulation_end`` (1-based, inclusive); the defaults
1..51 are the official ``--modulation_starts 0 --modulation_ends 50`` on its 0-based
epochs. ``alpha`` 0.8 is the official recommendation for CREMA-D.

Which tensors: the official code modulates the encoder parameters whose gradient has 4
dimensions, i.e. the convolution kernels of its ResNet-18 encoders, and leaves biases and
batch-norm parameters alone. Here the rule is "tensors of rank >= 2 of the modality's
encoder and projection": the convolution kernels of a CNN encoder as in the official code,
plus the linear weights of MLP / sequence / text encoders and of the projection, which the
official networks do not have (an MLP has no 4-d tensor, so the literal rule would modulate
nothing). Biases and normalisation parameters are never modulated.

Ours: any number of modalities, through the mean of the others. With two modalities whose
ratios are exactly 1 the official code still modulates audio (with ``k = 1 - tanh(alpha)``);
here neither is (a tie of two floating-point sums). The official sum fusion has one linear
layer per modality; equimodal's ``sum`` shares one head, whose unimodal logits are
``W z_m + b / M``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from equimodal.config import StrategyConfig
from equimodal.data.batch import MultimodalBatch
from equimodal.models.model import MultimodalModel
from equimodal.strategies.base import Strategy, any_present, masked_cross_entropy, register_strategy


class OGMGEConfig(StrategyConfig):
    """Options of ``ogm_ge``."""

    name: Literal["ogm_ge"] = "ogm_ge"
    alpha: float = Field(0.8, ge=0.0, description="modulation strength (official CREMA-D: 0.8)")
    modulation_start: int = Field(1, ge=1, description="first modulated epoch (1-based)")
    modulation_end: int = Field(
        51, ge=0, description="last modulated epoch (1-based, inclusive; official 0..50)"
    )
    noise: bool = Field(True, description="add the GE Gaussian noise (False: plain OGM)")


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


def modulated_parameters(model: MultimodalModel, modality: str) -> list[torch.nn.Parameter]:
    """The tensors OGM-GE modulates: rank >= 2 parameters of the modality's encoder and
    projection (convolution kernels and linear weights; not biases or norms)."""
    return [p for p in model.modality_parameters(modality) if p.dim() >= 2]


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
        rows = any_present(batch.present)
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
                for p in modulated_parameters(ctx.model, m):
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
