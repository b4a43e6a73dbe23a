"""``mmpareto``: Pareto integration of the multimodal and unimodal gradients (Wei and Hu,
*MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance*, ICML 2024).

Source: the official implementation (github.com/GeWu-Lab/MMPareto_ICML2024),
``train_epoch`` of ``code/MMPareto.py`` with ``MinNormSolver`` of
``code/min_norm_solvers.py`` (run by ``code/script/mmpareto.sh``); BalanceBenchmark's port
is ``balancemm/trainer/MMPareto_trainer.py`` (github.com/GeWu-Lab/BalanceBenchmark).

Each batch, one forward pass (dropout drawn once) gives the fused logits and every
modality's own logits; the losses are ``L_mm = CE(fused, y)`` and ``L_m = CE(logits_m, y)``.
For each modality ``m``, on its shared parameters (encoder and projection, which both
``L_mm`` and ``L_m`` reach):

- ``g_mm`` and ``g_m``: the gradients of ``L_mm`` and of ``L_m`` alone;
- ``cos = cos(g_mm, g_m)`` over all of ``m``'s shared parameters at once;
- ``cos > 0``: ``k = (1/2, 1/2)``; otherwise ``k = (gamma, 1 - gamma)``, the min-norm
  (MGDA) point of the segment between ``g_mm`` and ``g_m``, in closed form
  ``gamma = <g_m, g_m - g_mm> / ||g_mm - g_m||^2``, set to 0.999 when
  ``<g_mm, g_m> >= ||g_mm||^2`` and to 0.001 when ``<g_mm, g_m> >= ||g_m||^2`` (the
  official solver's end points);
- per parameter tensor ``p``: ``h = 2 (k_mm g_mm[p] + k_m g_m[p])``; with ``t`` the plain
  gradient of ``L_mm + sum_k L_k`` on ``p``, the gradient becomes
  ``alpha * max(1, ||t|| / ||h||) * h`` (the official magnitude: at least that of the
  summed gradient, times ``alpha`` = the official ``gamma`` 1.5).

Every other parameter (the fusion and its classifier) gets the plain gradient of
``L_mm + sum_m L_m``. Options: ``alpha`` (1.5, the official and BalanceBenchmark value).

Differences from the official code, and why:

- **Unimodal logits.** The official model has a separate linear head per modality besides
  the fused head; equimodal uses the fusion's own per-modality logits (``concat``: the
  modality's block of the fused head, as BalanceBenchmark's model does), so that no
  parameters live outside the model. The head is not modulated in either.
- **A zero integrated gradient.** When ``h`` of a tensor is exactly zero the official
  ratio is ``inf`` or ``nan``; equimodal sets that tensor's gradient to zero (no common
  descent direction exists there).
- **Every epoch.** BalanceBenchmark adds a modulation window (epochs 0 to 80) and, as
  released, collects ``g_mm`` and ``g_m`` after backward passes that accumulate into each
  other (both are then the summed gradient, so its rule is ``alpha`` times plain joint
  training) and leaves the weights at 0 in the conflict branch; equimodal follows the
  original repository, which integrates in every batch.
- **Dot products.** The official solver sums the dot products over each tensor and over
  the concatenation of them (each counted twice); ``gamma`` is unchanged by that factor.
- **Missing modalities**: ``L_m`` is over the rows that have ``m``, ``L_mm`` over the rows
  that have any modality; a modality absent from the whole batch has ``g_mm = g_m = 0``
  on its encoder (its rows are filled in), which then gets a zero gradient.

- **Optimizer.** The official runs use SGD (momentum 0.9, lr 0.002); equimodal uses the
  run's optimizer (AdamW by default), whose per-parameter normalisation largely absorbs
  ``alpha`` and the rescaling: there MMPareto acts through the conflict branch's
  direction (``optim.name=sgd`` for the official setting).

Ours: **any number of modalities** (each encoder is shared by ``L_mm`` and its own
``L_m`` only, so the two-objective integration runs per modality as in the official
two-modality code) and **any fusion** whose per-modality logits read only ``z_m``
(all of equimodal's).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from equimodal.config import StrategyConfig
from equimodal.data.batch import MultimodalBatch
from equimodal.strategies.base import Strategy, any_present, masked_cross_entropy, register_strategy

#: the official solver's end points when the optimum lies at (or beyond) a segment end
GAMMA_HIGH, GAMMA_LOW = 0.999, 0.001


class MMParetoConfig(StrategyConfig):
    """Options of ``mmpareto`` (defaults: the official settings)."""

    name: Literal["mmpareto"] = "mmpareto"
    alpha: float = Field(
        1.5,
        gt=0.0,
        description="scale of the integrated encoder gradient (the official gamma, 1.5)",
    )


def min_norm_gamma(v11: float, v12: float, v22: float) -> float:
    """The official two-vector min-norm solution: ``gamma`` minimising
    ``||gamma x1 + (1 - gamma) x2||`` from ``<x1,x1>``, ``<x1,x2>``, ``<x2,x2>``, with
    the solver's end points 0.999 and 0.001."""
    if v12 >= v11:
        return GAMMA_HIGH
    if v12 >= v22:
        return GAMMA_LOW
    return (v22 - v12) / (v11 + v22 - 2.0 * v12)


def pareto_weights(g_mm: torch.Tensor, g_uni: torch.Tensor) -> tuple[float, float, float]:
    """``(k_mm, k_uni, cos)`` for the flattened gradients of one modality's parameters:
    ``(1/2, 1/2)`` when they agree (cosine > 0), the min-norm weights otherwise."""
    cos = float(F.cosine_similarity(g_mm, g_uni, dim=0))
    if cos > 0:
        return 0.5, 0.5, cos
    v11 = float(torch.dot(g_mm, g_mm))
    v12 = float(torch.dot(g_mm, g_uni))
    v22 = float(torch.dot(g_uni, g_uni))
    gamma = min_norm_gamma(v11, v12, v22)
    return gamma, 1.0 - gamma, cos


def integrate(
    total: torch.Tensor,
    g_mm: torch.Tensor,
    g_uni: torch.Tensor,
    k_mm: float,
    k_uni: float,
    alpha: float,
) -> torch.Tensor:
    """One tensor's new gradient: ``h = 2 (k_mm g_mm + k_uni g_uni)`` scaled by
    ``alpha * max(1, ||total|| / ||h||)`` (zero when ``h`` is zero)."""
    new = 2 * k_mm * g_mm + 2 * k_uni * g_uni
    new_norm = torch.norm(new)
    if float(new_norm) == 0.0:
        return new * alpha
    ratio = torch.norm(total) / new_norm
    if float(ratio) > 1:
        return ratio * new * alpha
    return new * alpha


def _flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


@register_strategy
class MMParetoStrategy(Strategy):
    """Fused and unimodal losses, with each encoder's two gradients Pareto-integrated."""

    name = "mmpareto"
    config_class = MMParetoConfig
    default_fusion = "concat"
    config: MMParetoConfig

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        model = ctx.model
        out = model(batch, with_unimodal=True)
        assert out.unimodal_logits is not None
        rows = any_present(batch.present)
        loss_mm = masked_cross_entropy(out.logits, batch.labels, rows)
        losses = {
            m: masked_cross_entropy(out.unimodal_logits[m], batch.labels, batch.present[m])
            for m in ctx.modalities
        }
        shared = {
            m: [p for p in model.modality_parameters(m) if p.requires_grad] for m in ctx.modalities
        }
        every = [p for m in ctx.modalities for p in shared[m]]
        g_mm_all = _grads(loss_mm, every)
        g_mm, start = {}, 0
        for m in ctx.modalities:
            g_mm[m] = g_mm_all[start : start + len(shared[m])]
            start += len(shared[m])
        g_uni = {m: _grads(losses[m], shared[m]) for m in ctx.modalities}
        weights = {m: pareto_weights(_flat(g_mm[m]), _flat(g_uni[m])) for m in ctx.modalities}
        alpha = self.config.alpha

        def integrate_encoders() -> None:
            for m in ctx.modalities:
                k_mm, k_uni, _ = weights[m]
                for p, a, b in zip(shared[m], g_mm[m], g_uni[m], strict=True):
                    if p.grad is None:
                        continue
                    p.grad = integrate(p.grad, a, b, k_mm, k_uni, alpha)

        total = loss_mm + torch.stack(list(losses.values())).sum()
        ctx.optimizer_step(total, integrate_encoders)
        logs = {"loss": float(total.detach()), "loss_fused": float(loss_mm.detach())}
        for m in ctx.modalities:
            logs[f"loss_{m}"] = float(losses[m].detach())
            logs[f"cos_{m}"] = weights[m][2]
            logs[f"k_mm_{m}"] = weights[m][0]
        return logs


def _grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Gradients of ``loss`` on ``params`` (zeros where it does not reach), graph kept."""
    if not params:
        return []
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
