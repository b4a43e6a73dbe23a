"""``agm``: adaptive gradient modulation (Li et al., ICCV 2023; METHODS.md §2.1).

Mono-modal responses: the Shapley values of the model output over zero-filled inputs with
``f(empty) = 0``, so that they sum to the output: ``phi_m = sum_S w(|S|) [f(S + m) - f(S)]``
where ``f(S)`` is the logits with the modalities outside ``S`` zero-filled. Each batch:
``s_m`` = cross-entropy of ``softmax(phi_m)``; ``r_m = exp(M/(M-1) (mean_k s_k - s_m))``;
the reference ``r^_m`` is the same formula on the running means of ``s_m`` since the start
of training (before this batch); ``kappa_m = exp(alpha * min(r^_m - r_m, clip))``. The
gradient flowing into ``phi_m`` is multiplied by ``kappa_m`` and the loss is
``CE(sum_m phi_m, y)``. When any gradient element of the classifier head leaves [-1, 1] the
gradient norm is clipped to 1.

Implementation note (ours): the encoders run once on the batch and once on an all-zero
input; every coalition then reuses those features and runs only the fusion and head
(``2^M - 1`` fusion passes), which equals zero-filling the inputs. The masked passes run
in eval mode (with gradients), the full pass in training mode.
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
from equimodal.strategies.base import Strategy, register_strategy


class AGMConfig(StrategyConfig):
    """Options of ``agm``."""

    name: Literal["agm"] = "agm"
    alpha: float = Field(1.0, ge=0.0)
    clip: float = Field(10.0, gt=0.0)


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``factor`` in the backward pass."""
    return x * factor + x.detach() * (1.0 - factor)


def response_coefficients(
    scores: dict[str, float], running: dict[str, float] | None, alpha: float, clip: float
) -> dict[str, float]:
    """``kappa_m`` from this batch's ``s_m`` and the running means (None: all 1)."""
    names = list(scores)
    m = len(names)

    def ratios(s: dict[str, float]) -> dict[str, float]:
        mean = sum(s.values()) / m
        return {k: math.exp(m / (m - 1) * (mean - s[k])) for k in names}

    if running is None:
        return {k: 1.0 for k in names}
    r, r_ref = ratios(scores), ratios(running)
    return {k: math.exp(alpha * min(r_ref[k] - r[k], clip)) for k in names}


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
        self.score_sums: dict[str, float] = {}
        self.batches = 0

    def responses(self, batch: MultimodalBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-modality responses ``phi_m`` (with gradients) and the full output ``f(all)``."""
        model = self.context.model
        names = list(model.modalities)
        z = model.encode(batch)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            zeros = {
                m: model.encode_modality(m, torch.zeros_like(batch.inputs[m][:1])) for m in names
            }
        present = {m: torch.ones_like(batch.present[m]) for m in names}
        size = len(names)
        full = (1 << size) - 1
        outputs: dict[int, torch.Tensor] = {}
        for mask in range(1, full):  # masked passes: eval mode, with gradients
            zs = {
                m: z[m] if mask >> i & 1 else zeros[m].expand_as(z[m]) for i, m in enumerate(names)
            }
            outputs[mask] = model.fuse(zs, present).logits
        model.train(was_training)
        outputs[full] = model.fuse(z, present).logits
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

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        phi, _ = self.responses(batch)
        scores = {
            m: float(ctx.batch_mean(F.cross_entropy(p.detach(), batch.labels)))
            for m, p in phi.items()
        }
        running = {m: self.score_sums[m] / self.batches for m in phi} if self.batches > 0 else None
        kappa = response_coefficients(scores, running, self.config.alpha, self.config.clip)
        for m, s in scores.items():
            self.score_sums[m] = self.score_sums.get(m, 0.0) + s
        self.batches += 1
        total = sum(scale_gradient(phi[m], kappa[m]) for m in phi)
        loss = F.cross_entropy(total, batch.labels)
        head = [p for p in ctx.model.fusion_parameters() if p.requires_grad]

        def clip_when_head_gradient_is_large() -> None:
            if any(p.grad is not None and bool((p.grad.abs() > 1).any()) for p in head):
                torch.nn.utils.clip_grad_norm_(
                    [p for p in ctx.model.parameters() if p.grad is not None], 1.0
                )

        ctx.optimizer_step(loss, clip_when_head_gradient_is_large)
        logs = {"loss": float(loss.detach())}
        logs.update({f"kappa_{m}": k for m, k in kappa.items()})
        return logs

    def state_dict(self) -> dict[str, Any]:
        return {"score_sums": self.score_sums, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.score_sums = dict(state.get("score_sums", {}))
        self.batches = int(state.get("batches", 0))
