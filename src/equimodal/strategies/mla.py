"""``mla``: multimodal learning with alternating unimodal adaptation (Zhang et al., CVPR
2024), with the official code's gradient projection.

Source: the official implementation (github.com/Cecile-hi/Multimodal-Learning-with-
Alternating-Unimodal-Adaptation): ``GSPlugin`` in ``utils/utils.py`` and its use in
``train_epoch`` of ``main.py``.

A head shared by all modalities (fusion ``shared``) is trained in per-batch unimodal steps,
modalities in a fixed order (the dataset's). One projector ``P`` (``P_0 = I``) keeps the
head from forgetting one modality while it learns another. In each unimodal step of
modality ``m``, after the backward pass and before the optimizer step:

- ``alpha_t = 0.1 ** (1 + i / n)``, ``i`` the batch's index in the epoch (from 0) and ``n``
  the number of batches per epoch;
- ``r`` = the batch mean of ``m``'s features (the head's input), ``k = P r``,
  ``P <- P - k k^T / (alpha_t + r^T k)``, then ``P <- P / ||P||_F``;
- the head weight's gradient becomes ``grad_W P^T`` (the bias is not projected).

The very first unimodal step of the run changes nothing (neither ``P`` nor the gradient),
as in the official code. At test time the modalities' logits are fused with per-sample
weights ``exp(max_k e_k - e_m)`` normalised, ``e_m`` the entropy of modality ``m``'s
prediction.

Differences from the official code, and our choices:

- As released, the official projection never runs: ``GSPlugin`` looks for a parameter
  named ``module.weight`` in the head, whose parameters are named ``weight`` and ``bias``.
  equimodal runs it, as the paper describes.
- The official denominator ``alpha + torch.mm(k, r)`` is a ``d x d`` matrix (the outer
  product ``k r^T``, divided element by element), which the code never reaches; equimodal
  divides by the scalar ``alpha_t + r^T k`` of the paper's orthogonal weight modification.
- The official test-time entropy is taken over the batch axis (one weight per modality
  and batch); equimodal follows the paper: one weight per sample.
- ``n`` is the number of batches the loop yields per epoch: the option
  ``batches_per_epoch`` when given, else what the loop tells the strategy
  (``TrainContext.batches_per_epoch``), exact from the first batch. Without either (a
  strategy driven by hand) it is counted during the first epoch and used from the second
  on (kept in the strategy state), with ``alpha_t = 0.1`` until then.
- Rows missing modality ``m`` take no part in ``m``'s step or its mean feature ``r``; a
  modality absent from a whole batch skips its step (no update is counted).
- Any number of modalities: the same single projector, updated in every unimodal step in
  turn (the official three-modality path does the same).
- Under torchrun, ``r`` is the global batch's mean and every rank applies the same update.
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
    projection: bool = Field(True, description="project the head gradient (GSPlugin)")
    batches_per_epoch: int | None = Field(
        None,
        gt=0,
        description="batches per epoch in alpha_t = 0.1^(1 + i/n) (null: counted in the first "
        "epoch; alpha_t = 0.1 until then)",
    )
    test_fusion: Literal["entropy", "mean"] = "entropy"


def projection_alpha(batch_index: int, batches_per_epoch: int | None) -> float:
    """``alpha_t = 0.1 ** (1 + i / n)`` (``0.1`` while ``n`` is unknown)."""
    fraction = batch_index / batches_per_epoch if batches_per_epoch else 0.0
    return 1.0 * 0.1 ** (fraction + 1)


def update_projector(p: torch.Tensor, r: torch.Tensor, alpha: float) -> torch.Tensor:
    """``k = P r``; ``P - k k^T / (alpha + r^T k)``, divided by its Frobenius norm."""
    k = p @ r
    p = p - torch.outer(k, k) / (alpha + r @ k)
    return p / torch.linalg.matrix_norm(p)


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
        self.projector: torch.Tensor | None = None  # P; built in setup (identity)
        #: unimodal steps taken so far in the run (the official ``exp_count``)
        self.updates = 0
        #: batches taken so far in the current (or, between epochs, the last) epoch
        self.batch_index = 0
        #: batches per epoch counted in the first epoch (None until it ended)
        self.counted_batches: int | None = None

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        weight = ctx.model.head_weight()
        if self.projector is None:
            self.projector = torch.eye(ctx.model.dim, dtype=weight.dtype, device=weight.device)
        else:
            self.projector = self.projector.to(device=weight.device, dtype=weight.dtype)

    @property
    def batches_per_epoch(self) -> int | None:
        """``n`` of the alpha schedule: the option, else what the loop says, else the
        count of the first epoch."""
        known = self.ctx.batches_per_epoch if self.ctx is not None else None
        return self.config.batches_per_epoch or known or self.counted_batches

    def alpha(self) -> float:
        """``alpha_t`` of the current batch."""
        return projection_alpha(self.batch_index, self.batches_per_epoch)

    def on_epoch_start(self, epoch: int) -> None:
        if self.counted_batches is None and self.batch_index > 0:
            self.counted_batches = self.batch_index  # the first epoch just ended
        self.batch_index = 0

    def inference_kwargs(self) -> dict[str, Any]:
        """Test-time fusion of the shared head's per-modality logits (entropy or mean)."""
        return {"fusion_kwargs": {"combine": self.config.test_fusion}}

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        weight = ctx.model.head_weight()
        alpha = self.alpha()
        logs: dict[str, float] = {}
        losses = []
        for m in ctx.modalities:
            rows = batch.present[m]
            if not ctx.global_any(rows):
                continue
            z = ctx.model.encode_modality(m, batch.inputs[m])
            loss = masked_cross_entropy(ctx.model.modality_logits(m, z), batch.labels, rows)
            # the batch-mean feature (of the global batch under torchrun)
            r = ctx.row_mean(z[rows].detach()) if self.config.projection else None

            def before_update(r: torch.Tensor | None = r) -> None:
                """The official ``GSPlugin.before_update``: skipped on the very first step."""
                if r is None or self.updates == 0 or self.projector is None:
                    return
                self.projector = update_projector(self.projector, r.to(weight.dtype), alpha)
                if weight.grad is not None:
                    weight.grad.copy_(weight.grad @ self.projector.T)

            ctx.optimizer_step(loss, before_update)
            self.updates += 1
            logs[f"loss_{m}"] = float(loss.detach())
            losses.append(logs[f"loss_{m}"])
        self.batch_index += 1
        logs["loss"] = sum(losses) / max(len(losses), 1)
        return logs

    def state_dict(self) -> dict[str, Any]:
        return {
            "projector": None if self.projector is None else self.projector.cpu().tolist(),
            "updates": self.updates,
            "batch_index": self.batch_index,
            "counted_batches": self.counted_batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("projector") is not None:
            weight = self.context.model.head_weight() if self.ctx else None
            self.projector = torch.tensor(
                state["projector"],
                dtype=weight.dtype if weight is not None else torch.float32,
                device=weight.device if weight is not None else "cpu",
            )
        self.updates = int(state.get("updates", 0))
        self.batch_index = int(state.get("batch_index", 0))
        counted = state.get("counted_batches")
        self.counted_batches = int(counted) if counted is not None else None
