"""``reconboost``: modality-alternating boosting with reconcilement (Hua, Xu, Bao, Yang,
Huang, *ReconBoost: Boosting Can Achieve Modality Reconcilement*, ICML 2024; see
docs/methods.md).

Source: the official code (github.com/huacong/ReconBoost): the loop of ``main`` in
``train.py`` (two modalities) and ``train_MSA.py`` (three), ``DynamicNet`` in
``models/dynamic_net.py``, ``schedule_model`` in ``schedule.py``; BalanceBenchmark's port
(github.com/GeWu-Lab/BalanceBenchmark, ``balancemm/trainer/ReconBoost_trainer.py`` with
``BaseClassifierReconBoostModel`` in ``balancemm/models/avclassify_model.py``).

Training runs in *stages*. Stage ``s`` (from 0) picks modality ``m = order[s mod M]``
(the official fixed round robin) and takes ``boost_epochs + rectify_epochs`` epochs of
the loop:

1. **Alternating boosting** (``boost_epochs`` epochs, official ``epochs_per_stage``): only
   ``m``'s encoder, projection and the head that reads it are trained, on
   ``loss = boost + alpha * consolidation`` with, per sample (``C`` classes)

   ``boost_i = (1/C) * (-w1 * log p_m[y] + w2 * q[y] * log p_m[y])``

   ``p_m = softmax(logits_m)`` and ``q = softmax(F_-m)``, ``F_-m`` the current ensemble
   of the *other* modalities (no gradient): the model's fused logits reading only the
   other modalities already trained in an earlier stage; with none (the first stage),
   ``q[y] = 1`` (the official constant ``c0``, a softmax over one column). The first term
   is the cross-entropy, the second the KL-based reconcilement: samples the others
   already classify well weigh less, so ``m`` learns what the others miss.
   ``consolidation = MSE(softmax(logits_m), softmax(logits_prev))`` (mean over samples
   and classes), ``prev`` the modality before ``m`` in the order, from stage 1 on.
2. **Global rectification** (``rectify_epochs`` epochs, official ``correct_epoch``):
   ``CE`` of the fused logits of every modality trained so far (``m`` included), all their
   parameters trained.

Prediction: the fused logits of the modalities trained so far (those of the stages up to
the current one), every modality from stage ``M - 1`` on.

Defaults (official ``train.py`` and its README for CREMA-D): ``weight1`` 5, ``weight2`` 1,
``alpha`` 0.5, ``boost_epochs`` 4, ``rectify_epochs`` 4 (BalanceBenchmark: 1 and 1;
``train_MSA.py``: ``weight1`` 1, ``weight2`` 0.25). Fusion: ``shared`` (one head for every
modality, the official ``common_space``), or ``late`` (one head per modality, the
official path without it).

Differences from the official code, and why:

- **Early stopping** (not in the official loop) cannot end a run before every modality
  has had a stage: patience restarts at each stage's end until then.
- **Consolidation has no gradient by default.** The official term detaches both
  predictions (``mse_criterion(out_obj.detach().softmax(1), pre_out_obj.detach()
  .softmax(1))``, ``train.py``, and the same in BalanceBenchmark), so it changes the loss
  value and nothing else; equimodal does the same. ``consolidation_gradient: true`` lets
  it pull ``p_m`` towards ``p_prev`` (the paper's memory consolidation), ``p_prev`` still
  without gradient.
- **Ensemble scale.** The official ensemble is ``boost_rate * sum_k logits_k``, with
  ``boost_rate`` a scalar learnt in the rectification phase (initialised to 1; 0.01 in
  BalanceBenchmark). equimodal's ensemble is the model's own fusion of the other
  modalities (``shared`` and ``late``: the mean of their present logits), in the
  rectification loss and at prediction alike. For two modalities the boosting ensemble is
  the official one with ``boost_rate = 1``; a learnt scale would be a parameter outside
  the model. The prediction (argmax) is the same for any positive scale.
- **Features of the previous modality** for the consolidation come from the ensemble's
  pass (the same forward); the official code runs the previous modality again with a
  new dropout draw. With ``consolidation_gradient`` false this changes nothing.
- **Phases are whole epochs of the loop**, validated after each epoch; the official
  code evaluates once per stage (on its test set) and selects only from stage 3 on.
  equimodal selects on validation after every epoch.
- **One optimizer.** The official code builds a new SGD (momentum 0.9, weight decay
  5e-4) for each phase; equimodal uses the run's optimizer, whose parameters without a
  gradient in a step are not updated (so only ``m``'s parameters and its head move in a
  boosting step).
- **Rows missing a modality**: rows without ``m`` take no part in its boosting loss; rows
  with none of the ensemble's modalities get ``q[y] = 1`` (an empty ensemble); the
  consolidation reads rows with both ``m`` and ``prev``; the rectification rows with any
  trained modality. A batch without ``m`` skips the boosting step.
- Model, optimizer and schedule are equimodal's (the run's config); the shared head is
  linear (the official ``Head`` is a two-layer MLP).

Ours, beyond the official code: **any number of modalities** (``M >= 2``) in the order
``order`` (the dataset's by default); the ensemble of the others is every other modality
already trained, as ``DynamicNet`` holds them (``train_MSA.py`` for three).
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


class ReconBoostConfig(StrategyConfig):
    """Options of ``reconboost``."""

    name: Literal["reconboost"] = "reconboost"
    weight1: float = Field(5.0, ge=0.0, description="w1: weight of the cross-entropy term")
    weight2: float = Field(1.0, ge=0.0, description="w2: weight of the KL-based reconcilement term")
    alpha: float = Field(0.5, ge=0.0, description="weight of the memory consolidation term")
    boost_epochs: int = Field(
        4, gt=0, description="epochs of alternating boosting per stage (official epochs_per_stage)"
    )
    rectify_epochs: int = Field(
        4, ge=0, description="epochs of global rectification per stage (official correct_epoch)"
    )
    consolidation_gradient: bool = Field(
        False,
        description="let the consolidation term train the modality (official: detached, no "
        "gradient)",
    )
    order: list[str] | None = Field(
        None, description="the round-robin order of the modalities (null: the dataset's)"
    )


def boosting_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ensemble_true_prob: torch.Tensor,
    weight1: float,
    weight2: float,
) -> torch.Tensor:
    """Per sample ``(1/C)(-w1 log p[y] + w2 q[y] log p[y])``; ``q[y]`` the ensemble's
    probability of the true class (no gradient)."""
    log_p = F.log_softmax(logits, 1).gather(1, labels[:, None]).squeeze(1)
    q = ensemble_true_prob.detach()
    return (-weight1 * log_p + weight2 * q * log_p) / logits.shape[1]


@register_strategy
class ReconBoostStrategy(Strategy):
    """Alternating boosting of one modality at a time, then global rectification."""

    name = "reconboost"
    config_class = ReconBoostConfig
    default_fusion = "shared"
    fusions = ("shared", "late")
    config: ReconBoostConfig

    def __init__(self, config: ReconBoostConfig) -> None:
        super().__init__(config)
        #: the current (or, between epochs, the last) epoch, 1-based; 0 before training
        self.epoch = 0

    def setup(self, ctx: TrainContext) -> None:
        if len(ctx.modalities) < 2:
            raise ValueError(
                f"strategy reconboost alternates between modalities; this dataset has "
                f"{len(ctx.modalities)}"
            )
        order = self.config.order
        if order is not None and sorted(order) != sorted(ctx.modalities):
            raise ValueError(
                f"strategy reconboost: order {order} is not an order of the dataset's "
                f"modalities {list(ctx.modalities)}"
            )
        super().setup(ctx)

    # ------------------------------------------------------------------ schedule
    @property
    def order(self) -> tuple[str, ...]:
        return tuple(self.config.order or self.context.modalities)

    def schedule(self, epoch: int) -> tuple[int, str, str]:
        """``(stage, phase, modality)`` of ``epoch`` (1-based): ``phase`` is ``boost`` or
        ``rectify``."""
        cfg = self.config
        stage, within = divmod(max(epoch, 1) - 1, cfg.boost_epochs + cfg.rectify_epochs)
        phase = "boost" if within < cfg.boost_epochs else "rectify"
        return stage, phase, self.order[stage % len(self.order)]

    def trained_before(self, stage: int) -> list[str]:
        """Modalities trained in a stage before ``stage``, in dataset order."""
        seen = {self.order[k % len(self.order)] for k in range(min(stage, len(self.order)))}
        return [m for m in self.context.modalities if m in seen]

    def previous(self, modality: str) -> str:
        """The modality before ``modality`` in the round-robin order (cyclic)."""
        order = self.order
        return order[(order.index(modality) - 1) % len(order)]

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    # ------------------------------------------------------------------ training
    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        stage, phase, modality = self.schedule(self.epoch)
        if phase == "boost":
            return self.boost_step(batch, stage, modality)
        return self.rectify_step(batch, self.trained_before(stage + 1))

    def boost_loss(
        self, batch: MultimodalBatch, stage: int, modality: str
    ) -> tuple[torch.Tensor, dict[str, float]] | None:
        """The boosting step's loss and logs (None when no row has ``modality``)."""
        ctx, cfg = self.context, self.config
        model = ctx.model
        rows = batch.present[modality]
        if not bool(rows.any()):
            return None
        labels = batch.labels
        ensemble = [k for k in self.trained_before(stage) if k != modality]
        z_other: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            q = torch.ones(labels.shape[0], device=labels.device)
            if ensemble:
                z_other = {k: model.encode_modality(k, batch.inputs[k]) for k in ensemble}
                fused = model.fuse(z_other, batch.present, modalities=ensemble).logits
                has = torch.zeros_like(rows)
                for k in ensemble:
                    has = has | batch.present[k]
                p = torch.softmax(fused, 1).gather(1, labels[:, None]).squeeze(1)
                q = torch.where(has, p, torch.ones_like(p))
        z = model.encode_modality(modality, batch.inputs[modality])
        logits = model.modality_logits(modality, z)
        per_sample = boosting_loss(logits, labels, q, cfg.weight1, cfg.weight2)
        boost = per_sample[rows].mean()
        loss = boost
        logs = {"boost": float(boost.detach())}
        prev = self.previous(modality)
        if stage > 0 and prev in z_other:
            both = rows & batch.present[prev]
            if bool(both.any()):
                with torch.no_grad():
                    p_prev = torch.softmax(model.modality_logits(prev, z_other[prev]), 1)
                p_m = torch.softmax(logits, 1)
                if not cfg.consolidation_gradient:
                    p_m = p_m.detach()
                consolidation = F.mse_loss(p_m[both], p_prev[both])
                loss = boost + cfg.alpha * consolidation
                logs["consolidation"] = float(consolidation.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs

    def boost_step(self, batch: MultimodalBatch, stage: int, modality: str) -> dict[str, float]:
        """One step of alternating boosting of ``modality``."""
        out = self.boost_loss(batch, stage, modality)
        if out is None:
            return {}
        loss, logs = out
        self.context.optimizer_step(loss)
        return logs

    def rectify_loss(self, batch: MultimodalBatch, names: list[str]) -> torch.Tensor:
        """``CE`` of the fused logits of ``names`` over the rows that have any of them."""
        model = self.context.model
        z = {k: model.encode_modality(k, batch.inputs[k]) for k in names}
        logits = model.fuse(z, batch.present, modalities=names).logits
        rows = any_present(batch.present, names)
        return masked_cross_entropy(logits, batch.labels, rows)

    def rectify_step(self, batch: MultimodalBatch, names: list[str]) -> dict[str, float]:
        """One step of global rectification of the modalities ``names``."""
        loss = self.rectify_loss(batch, names)
        self.context.optimizer_step(loss)
        value = float(loss.detach())
        return {"loss": value, "rectify": value}

    def restarts_patience(self) -> bool:
        """True after the last epoch of each stage until every modality has had one: early
        stopping (which the official loop does not have) may not end a run whose
        prediction still leaves modalities out."""
        stage, _, _ = self.schedule(self.epoch)
        last_of_stage = self.schedule(self.epoch + 1)[0] != stage
        return last_of_stage and stage < len(self.order) - 1

    # ------------------------------------------------------------------ prediction
    def inference_kwargs(self) -> dict[str, Any]:
        """Read only the modalities trained so far (all, from stage ``M - 1`` on)."""
        stage, _, _ = self.schedule(self.epoch)
        names = self.trained_before(stage + 1)
        if len(names) == len(self.context.modalities):
            return {}
        return {"modalities": names}

    def epoch_log(self) -> dict[str, Any]:
        stage, phase, modality = self.schedule(self.epoch)
        return {"stage": stage, "phase": phase, "modality": modality}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
