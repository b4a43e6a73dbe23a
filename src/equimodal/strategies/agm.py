"""``agm``: adaptive gradient modulation (Li et al., ICCV 2023), as the official code does it.

Source: the official implementation (github.com/lihong2303/AGM_ICCV2023), two modalities
in ``model/CREMAD_net.py`` (``GradMod``) with the loop of ``run/CREMAD_main.py``
(``train``), three in ``model/URFunny_net.py`` with ``run/URFunny_main.py``.

Each batch:

- **Coalition outputs.** ``f(all)`` is one pass of the whole model in training mode (dropout
  on, batch statistics). Every other coalition ``S`` is a pass of the whole model in
  evaluation mode (dropout off, running statistics) with the inputs of the modalities
  outside ``S`` replaced by zeros; ``f(empty) = 0``. All passes keep their gradients.
- **Mono-modal responses** are the Shapley values of these outputs,
  ``phi_m = sum_{S not containing m} w(|S|) [f(S + m) - f(S)]`` with
  ``w(k) = k! (M-k-1)! / M!``; they sum to ``f(all)``. For two modalities this is the
  official ``phi_a = (f(all) - f(v) + f(a)) / 2``, for three the official URFunny formula.
- **Scores**: ``s_m`` = the batch mean of ``-log softmax(phi_m)[y]``, each sample's term
  capped at ``-log(1e-8)``.
- **Coefficients**: ``r_m = exp(M/(M-1) (mean_k s_k - s_m))`` (``exp(s_other - s_m)`` for
  two modalities); ``r^_m`` is the same formula on the running means ``S_m`` of the scores
  of all earlier batches (0 before the first batch); ``kappa_m = exp(alpha * min(r^_m -
  r_m, clip))``. Then ``S_m <- S_m (t-1)/t + s_m / t`` for the ``t``-th batch.
- **Loss and gradient**: ``CE(sum_m phi_m, y)``; the gradient flowing into ``phi_m`` is
  multiplied by ``kappa_m`` (the official backward hook). After the backward pass, when
  any element of the classifier's weight gradient leaves ``[-limit, limit]`` the gradient
  of the whole model is clipped to norm ``limit`` (``head_grad_limit``, 1 as in CREMA-D).

Our choices: the encoders of the evaluation-mode passes run once per modality on the
real input and once on a single all-zero row (broadcast to the batch), and every coalition
reuses them: with per-modality encoders in evaluation mode this equals running the whole
model on zero-filled inputs, at ``2M`` encoder passes instead of ``M (2^M - 1)``. Any
number of modalities uses the exact Shapley weights above (for two and three modalities
they are the official formulas). The batch statistics are those of the global batch under
torchrun. The official code modulates only between two configurable epochs (by default
0 to 20; after that its hooks keep the last coefficients): equimodal modulates in every
epoch.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from equimodal.balance.shapley import shapley_weights
from equimodal.config import StrategyConfig
from equimodal.data.batch import MultimodalBatch
from equimodal.strategies.base import Strategy, masked_cross_entropy, register_strategy

#: each sample's score term is capped at -log(1e-8), as in the official loop
SCORE_CAP = -math.log(1e-8)


class AGMConfig(StrategyConfig):
    """Options of ``agm`` (defaults: the official CREMA-D settings)."""

    name: Literal["agm"] = "agm"
    alpha: float = Field(1.0, ge=0.0, description="strength of the modulation")
    clip: float = Field(
        10.0, gt=0.0, description="cap of r^_m - r_m inside kappa_m (official: 10; URFunny: 7)"
    )
    head_grad_limit: float = Field(
        1.0,
        gt=0.0,
        description="clip the gradient to this norm when a classifier-weight gradient element "
        "leaves [-limit, limit] (official: 1; URFunny: 5)",
    )


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``factor`` in the backward pass."""
    return x * factor + x.detach() * (1.0 - factor)


def response_ratios(scores: dict[str, float]) -> dict[str, float]:
    """``r_m = exp(M/(M-1) (mean_k s_k - s_m))`` (``exp(s_other - s_m)`` for two)."""
    m = len(scores)
    if m < 2:
        return {k: 1.0 for k in scores}
    mean = sum(scores.values()) / m
    return {k: math.exp(m / (m - 1) * (mean - s)) for k, s in scores.items()}


def response_coefficients(
    scores: dict[str, float], running: dict[str, float] | None, alpha: float, clip: float
) -> dict[str, float]:
    """``kappa_m = exp(alpha * min(r^_m - r_m, clip))`` from this batch's scores and the
    running means (None: all 1; the strategy passes zeros before its first batch, as the
    official loop does)."""
    if running is None:
        return {k: 1.0 for k in scores}
    r, r_ref = response_ratios(scores), response_ratios(running)
    return {k: math.exp(alpha * min(r_ref[k] - r[k], clip)) for k in scores}


@register_strategy
class AGMStrategy(Strategy):
    """Joint training with Shapley-response gradient modulation; see the module doc."""

    name = "agm"
    config_class = AGMConfig
    default_fusion = "concat"
    supports_distributed = True
    config: AGMConfig

    def __init__(self, config: AGMConfig) -> None:
        super().__init__(config)
        #: running mean of each modality's score over all batches so far
        self.running: dict[str, float] = {}
        self.batches = 0

    def responses(self, batch: MultimodalBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-modality responses ``phi_m`` (with gradients) and the full output ``f(all)``.

        ``f(all)`` is computed in the model's current mode (training mode during fit), every
        other coalition in evaluation mode on zero-filled inputs; the model's mode is
        restored afterwards.
        """
        model = self.context.model
        names = list(model.modalities)
        present = {m: torch.ones_like(batch.present[m]) for m in names}
        size = len(names)
        full = (1 << size) - 1
        outputs: dict[int, torch.Tensor] = {full: model.fuse(model.encode(batch), present).logits}
        was_training = model.training
        model.eval()
        try:
            real = {m: model.encode_modality(m, batch.inputs[m]) for m in names}
            zero = {
                m: model.encode_modality(m, torch.zeros_like(batch.inputs[m][:1])).expand_as(
                    real[m]
                )
                for m in names
            }
            for mask in range(1, full):
                zs = {m: real[m] if mask >> i & 1 else zero[m] for i, m in enumerate(names)}
                outputs[mask] = model.fuse(zs, present).logits
        finally:
            model.train(was_training)
        outputs[0] = torch.zeros_like(outputs[full])
        weight = shapley_weights(size)  # w(|S|) of the exact Shapley value
        phi = {}
        for i, m in enumerate(names):
            terms = [
                float(weight[bin(s).count("1")]) * (outputs[s | 1 << i] - outputs[s])
                for s in range(1 << size)
                if not s >> i & 1
            ]
            phi[m] = torch.stack(terms).sum(0)
        return phi, outputs[full]

    def scores(self, phi: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
        """``s_m``: the (global) batch mean of ``-log softmax(phi_m)[y]``, capped per sample."""
        ctx = self.context
        return {
            m: float(
                ctx.batch_mean(
                    F.cross_entropy(p.detach().float(), labels, reduction="none")
                    .clamp(max=SCORE_CAP)
                    .mean()
                )
            )
            for m, p in phi.items()
        }

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        phi, _ = self.responses(batch)
        scores = self.scores(phi, batch.labels)
        running = {m: self.running.get(m, 0.0) for m in phi}  # 0 before the first batch
        kappa = response_coefficients(scores, running, self.config.alpha, self.config.clip)
        self.batches += 1
        t = self.batches
        self.running = {m: running[m] * (t - 1) / t + scores[m] / t for m in phi}
        scaled = [scale_gradient(phi[m], kappa[m]) for m in phi]
        total = scaled[0]
        for term in scaled[1:]:
            total = total + term
        rows = torch.ones_like(batch.labels, dtype=torch.bool)
        loss = masked_cross_entropy(total, batch.labels, rows)
        limit = self.config.head_grad_limit
        heads = [p for p in ctx.model.head_parameters() if p.ndim == 2]  # classifier weights

        def clip_when_head_gradient_is_large() -> None:
            if any(p.grad is not None and bool((p.grad.abs() > limit).any()) for p in heads):
                torch.nn.utils.clip_grad_norm_(
                    [p for p in ctx.model.parameters() if p.grad is not None], limit
                )

        ctx.optimizer_step(loss, clip_when_head_gradient_is_large)
        logs = {"loss": float(loss.detach())}
        logs.update({f"kappa_{m}": k for m, k in kappa.items()})
        return logs

    def state_dict(self) -> dict[str, Any]:
        return {"running": dict(self.running), "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = int(state.get("batches", 0))
        if "running" in state:
            self.running = {m: float(v) for m, v in state["running"].items()}
        else:  # a checkpoint of the earlier version: score sums
            sums = state.get("score_sums", {})
            self.running = {m: float(v) / self.batches for m, v in sums.items()} if sums else {}
