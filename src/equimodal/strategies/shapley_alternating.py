"""``shapley_alternating``: Shapley-guided adaptive alternating training with cross-modal
memory (arXiv 2506.00030).

Each epoch has an order of the modalities. With ``alternate_every: batch`` (default),
every mini-batch is trained in M steps: step k encodes modality ``pi_k`` with gradients,
reuses the detached features of ``pi_1..pi_{k-1}`` from the earlier steps of the batch,
runs the memory chain over ``pi_1..pi_k`` and takes an optimizer step on
``CE(g(h_k), y) + align_weight * L_align``. With ``alternate_every: epoch`` (our choice
of the other reading), a round of M epochs trains one modality per epoch, in the order.
The M steps re-run the chain over the same pairs; the memory itself keeps that from
counting twice (see :mod:`equimodal.models.memory`): the moving average of each pair's
correlation statistic moves once per batch, and step k's optimizer update leaves the
learned maps of the pairs its prefix does not read exactly as they were.

After every epoch the trainer measures each modality's Shapley value on the validation
split; the next order is ascending (weakest, "minor" modality first; ties by modality
index). ``schedule_orders: train_order`` (default) scores each coalition of that
measurement through the order just trained (one memory chain per coalition), ``inference``
through the inference order set (our choice: the cheaper one; within noise of each other
over 10 seeds); the final reported values use the inference orders.
``order_by: edm`` ranks by the signed EDM deviation instead; ``fixed`` and ``random`` are
the ablations. Before the first epoch the order is the dataset's order.

Inference (``inference``): ``hybrid`` averages the final memory state over an order set
(all M! orders while M! <= max_orders, else the M cyclic shifts of the training order
plus seeded random orders, our choice); ``train_order`` uses the last training order;
``best_val_order`` the order of that set with the best validation accuracy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field

from equimodal.balance.edm import edm
from equimodal.balance.orders import hybrid_order_set, order_from_scores
from equimodal.config import StrategyConfig
from equimodal.data.batch import MultimodalBatch
from equimodal.strategies.base import Strategy, any_present, masked_cross_entropy, register_strategy

if TYPE_CHECKING:
    from equimodal.engine.validation import FeatureCache, SplitReport


class ShapleyAlternatingConfig(StrategyConfig):
    """Options of ``shapley_alternating``."""

    name: Literal["shapley_alternating"] = "shapley_alternating"
    alternate_every: Literal["batch", "epoch"] = "batch"
    order_by: Literal["shapley", "edm", "fixed", "random"] = "shapley"
    value: Literal["accuracy", "neg_loss", "true_class_prob"] = "accuracy"
    shapley_momentum: float = Field(0.0, ge=0.0, lt=1.0)
    inference: Literal["hybrid", "train_order", "best_val_order"] = "hybrid"
    max_orders: int = Field(24, gt=0)
    align_weight: float = Field(0.1, ge=0.0)
    #: how each epoch's validation Shapley values (the schedule) score a coalition:
    #: ``train_order`` through the order just trained only, one memory chain per coalition
    #: (cheaper; within noise of the other over 10 seeds on mfeat and HTAD), ``inference``
    #: as the model predicts (the hybrid order set)
    schedule_orders: Literal["inference", "train_order"] = "train_order"


@register_strategy
class ShapleyAlternatingStrategy(Strategy):
    """The primary method of equimodal; see the module docstring."""

    name = "shapley_alternating"
    config_class = ShapleyAlternatingConfig
    default_fusion = "memory"
    fusions = ("memory",)
    supports_distributed = True
    config: ShapleyAlternatingConfig

    def __init__(self, config: ShapleyAlternatingConfig) -> None:
        super().__init__(config)
        self.order: tuple[str, ...] = ()
        self.epoch_order: tuple[str, ...] = ()
        self.smoothed: list[float] | None = None
        self.best_order: tuple[str, ...] | None = None
        self.round_position = 0
        self._rng = np.random.default_rng(0)

    @property
    def schedule_value(self) -> str:
        """The coalition value the scheduler ranks by (``value``)."""
        return self.config.value

    def setup(self, ctx) -> None:
        super().setup(ctx)
        if not self.order:
            self.order = tuple(ctx.modalities)
        if not self.epoch_order:
            self.epoch_order = self.order
        self._rng = np.random.default_rng(ctx.seed)

    # ------------------------------------------------------------------ training
    def on_epoch_start(self, epoch: int) -> None:
        self.epoch_order = self.order

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        if self.config.alternate_every == "batch":
            return self._alternate_batch(batch)
        return self._alternate_epoch(batch)

    def _step_loss(self, zs, batch, prefix, logs, key) -> torch.Tensor:
        ctx = self.context
        weight = self.config.align_weight
        out = ctx.model.fuse(
            zs, batch.present, modalities=prefix, orders=[prefix], align_loss=weight > 0
        )
        rows = any_present(batch.present, prefix)
        loss = masked_cross_entropy(out.logits, batch.labels, rows)
        logs[f"loss_{key}"] = float(loss.detach())
        last_align = out.aux_losses[-1] if out.aux_losses else None
        if weight > 0 and last_align is not None:
            logs[f"align_{key}"] = float(last_align.detach())
            loss = loss + weight * last_align
        return loss

    def _alternate_batch(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        cached: dict[str, torch.Tensor] = {}
        logs: dict[str, float] = {}
        for k, m in enumerate(self.epoch_order):
            if not ctx.global_any(batch.present[m]):
                continue  # (under torchrun: absent from the whole global batch)
            # the modalities before m that this batch has (one absent from every sample
            # would be an identity step of the memory)
            prefix = tuple(n for n in self.epoch_order[:k] if n in cached) + (m,)
            z_m = ctx.model.encode_modality(m, batch.inputs[m])
            zs = {**cached, m: z_m}
            loss = self._step_loss(zs, batch, prefix, logs, m)
            ctx.optimizer_step(loss)
            cached[m] = z_m.detach()
        logs["loss"] = float(
            np.mean([v for k, v in logs.items() if k.startswith("loss_")] or [0.0])
        )
        return logs

    def _alternate_epoch(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        k = self.round_position
        prefix = self.epoch_order[: k + 1]
        m = prefix[-1]
        logs: dict[str, float] = {}
        with torch.no_grad():
            zs = {n: ctx.model.encode_modality(n, batch.inputs[n]) for n in prefix[:-1]}
        zs[m] = ctx.model.encode_modality(m, batch.inputs[m])
        loss = self._step_loss(zs, batch, prefix, logs, m)
        ctx.optimizer_step(loss)
        logs["loss"] = logs[f"loss_{m}"]
        return logs

    # ------------------------------------------------------------------ inference
    def candidate_orders(self) -> list[tuple[str, ...]]:
        """The hybrid order set around the current training order."""
        names = self.context.modalities
        index = {m: i for i, m in enumerate(names)}
        base = [index[m] for m in self.epoch_order or self.order]
        orders = hybrid_order_set(
            len(names), base_order=base, max_orders=self.config.max_orders, seed=self.context.seed
        )
        return [tuple(names[i] for i in o) for o in orders]

    def prepare_inference(self, cache: FeatureCache) -> None:
        if self.config.inference != "best_val_order":
            return
        from equimodal.engine.validation import predict_logits

        best, best_acc = None, -1.0
        for order in self.candidate_orders():
            logits = predict_logits(self.context.model, cache, orders=[order])
            acc = float((logits.argmax(1) == cache.labels).float().mean())
            if acc > best_acc:
                best, best_acc = order, acc
        self.best_order = best

    def schedule_inference(self) -> dict[str, Any] | None:
        if self.config.schedule_orders == "train_order":
            return {"orders": [self.epoch_order or self.order]}
        return None

    def inference_kwargs(self) -> dict[str, Any]:
        if self.config.inference == "hybrid":
            return {"orders": self.candidate_orders()}
        if self.config.inference == "best_val_order" and self.best_order is not None:
            return {"orders": [self.best_order]}
        return {"orders": [self.epoch_order or self.order]}

    # ------------------------------------------------------------------ scheduling
    def on_epoch_end(self, epoch: int, report: SplitReport) -> None:
        names = self.context.modalities
        if self.config.alternate_every == "epoch":
            self.round_position = (self.round_position + 1) % len(names)
            if self.round_position != 0:
                return  # the order changes only between rounds
        phi = report.schedule_shapley.values
        mom = self.config.shapley_momentum
        if self.smoothed is None or mom == 0.0:
            self.smoothed = [float(v) for v in phi]
        else:
            self.smoothed = [
                mom * s + (1 - mom) * float(v) for s, v in zip(self.smoothed, phi, strict=True)
            ]
        by = self.config.order_by
        if by == "shapley":
            ranked = order_from_scores(self.smoothed)
        elif by == "edm":
            ranked = order_from_scores(edm(np.asarray(self.smoothed)).deviations)
        elif by == "random":
            ranked = tuple(int(i) for i in self._rng.permutation(len(names)))
        else:
            ranked = tuple(range(len(names)))
        self.order = tuple(names[i] for i in ranked)

    def epoch_log(self) -> dict[str, Any]:
        log: dict[str, Any] = {"order": list(self.epoch_order), "next_order": list(self.order)}
        if self.config.inference == "best_val_order" and self.best_order is not None:
            log["best_val_order"] = list(self.best_order)
        return log

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "order": list(self.order),
            "epoch_order": list(self.epoch_order),
            "smoothed": self.smoothed,
            "best_order": list(self.best_order) if self.best_order else None,
            "round_position": self.round_position,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order = tuple(state["order"])
        self.epoch_order = tuple(state.get("epoch_order") or state["order"])
        self.smoothed = state.get("smoothed")
        best = state.get("best_order")
        self.best_order = tuple(best) if best else None
        self.round_position = int(state.get("round_position", 0))
        if "rng" in state:
            self._rng.bit_generator.state = state["rng"]
