"""``gblending``: Gradient-Blending (Wang, Tran, Feiszli, *What Makes Training Multi-modal
Classification Networks Hard?*, CVPR 2020), online, with the super-epochs of BalanceBenchmark.

Source: BalanceBenchmark (github.com/GeWu-Lab/BalanceBenchmark),
``balancemm/trainer/GBlending_trainer.py`` (``fit``, ``training_step``,
``super_epoch_origin``) with its defaults in ``configs/trainer_config.yaml`` (``method:
online``, ``super_epoch: 10``); the paper's online Gradient-Blend (its Algorithm 2). The
authors released no code.

The model has one loss per head: the fused logits and each modality's own logits
(``concat``: the modality's block of the fused head, as BalanceBenchmark's model). Each
batch the loss is ``sum_k w_k CE(logits_k, y)`` with weights ``w_k`` that sum to 1.

The weights are the overfitting-to-generalisation ratio (OGR) estimate of the paper,
re-estimated once per super-epoch of ``n`` epochs (``super_epoch``). Of each head ``k`` at
a checkpoint (the end of an epoch) we keep ``T_k``, its training loss (the mean over the
epoch's batches of the batch's loss, as it was computed for the step) and ``V_k``, its
loss on the validation split after that epoch. Within the ``j``-th super-epoch (epochs
``j n + 1 .. (j + 1) n``) the checkpoints are its first and its last epoch, ``s`` and
``e``; at the end of the last:

- ``G_k = V_k(s) - V_k(e)`` (the generalisation gain) and
  ``O_k = (V_k(e) - T_k(e)) - (V_k(s) - T_k(s))`` (the change in overfitting);
- ``w_k = |G_k| / O_k^2``, normalised to sum 1, are the weights of the next super-epoch.

The first super-epoch trains with equal weights ``1 / (M + 1)``.

Options: ``super_epoch`` (10, BalanceBenchmark's default), ``negative_gain`` (``abs``,
BalanceBenchmark's ``abs(g / o**2)``; ``zero`` gives a head whose validation loss rose
weight 0, the paper's reading of ``G`` as a gain).

Differences from BalanceBenchmark, and why:

- **Where the losses come from.** BalanceBenchmark (and the paper) measure each head on
  a copy of the model trained on that head's loss alone for ``n`` epochs from the
  checkpoint (``super_epoch_origin``), with the other modalities' inputs zeroed, then use
  the weights for the next ``n`` epochs of the real model. A strategy here sees the
  training batches only through its training step and validation only as cached
  features, so equimodal measures each head of the model it trains, at the first and the
  last epoch of each super-epoch, and applies the weights to the next super-epoch. The
  first super-epoch (where BalanceBenchmark already has probe weights) uses equal
  weights. Cost: no extra training, against ``M + 1`` extra runs of ``n`` epochs.
- **Means, not sums.** BalanceBenchmark sums the batch losses of an epoch (train and
  validation, over different numbers of batches); equimodal uses means, the paper's
  per-sample losses. (In ``O_k`` the sums' offsets cancel, but the scale of ``G_k``
  against ``O_k`` changes with the number of batches.)
- **Degenerate estimates.** ``O_k = 0`` would divide by zero; ``O_k^2`` is floored at
  ``1e-12``. When a head's losses are undefined (no rows) or every weight is 0, the
  previous weights are kept.
- BalanceBenchmark's ``offline`` variant (one estimate from probes trained for the
  whole run before training) is not provided: it needs the probes.
- **Missing modalities**: a modality's loss is over the rows that have it (train and
  validation), the fused loss over the rows that have any modality.

Ours: **any number of modalities** (``M`` modality heads and the fused head) and any
fusion whose per-modality logits exist (all of equimodal's).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from equimodal.config import StrategyConfig
from equimodal.data.batch import MultimodalBatch
from equimodal.strategies.base import (
    Strategy,
    TrainContext,
    masked_cross_entropy,
    register_strategy,
)

if TYPE_CHECKING:
    from equimodal.engine.validation import FeatureCache, SplitReport

#: the name of the fused head among the heads (a modality may not use it)
FUSED = "fused"
#: floor of O_k^2 in the OGR weights
OVERFIT_FLOOR = 1e-12
#: rows of cached validation features scored at a time
EVAL_ROWS = 4096


class GBlendingConfig(StrategyConfig):
    """Options of ``gblending`` (defaults: BalanceBenchmark's online settings)."""

    name: Literal["gblending"] = "gblending"
    super_epoch: int = Field(
        10,
        ge=2,
        description="epochs per re-estimation of the weights (measured between the first "
        "and the last epoch of each super-epoch; used in the next one)",
    )
    negative_gain: Literal["abs", "zero"] = Field(
        "abs",
        description="a head whose validation loss rose: |G|/O^2 (abs, BalanceBenchmark) "
        "or weight 0 (zero)",
    )


def ogr_weights(
    start: dict[str, tuple[float, float]],
    end: dict[str, tuple[float, float]],
    negative_gain: str = "abs",
) -> tuple[dict[str, float], dict[str, float], dict[str, float]] | None:
    """The OGR weights from each head's ``(train loss, validation loss)`` at two checkpoints.

    ``G_k = V_k(start) - V_k(end)``, ``O_k = (V_k(end) - T_k(end)) - (V_k(start) -
    T_k(start))``, ``w_k = |G_k| / O_k^2`` (``max(G_k, 0) / O_k^2`` with ``negative_gain``
    ``zero``), normalised to sum 1. Returns ``(w, G, O)``, or None when a loss is not
    finite or every weight is 0.
    """
    raw, gains, overfits = {}, {}, {}
    for k in start:
        t0, v0 = start[k]
        t1, v1 = end[k]
        if not all(math.isfinite(x) for x in (t0, v0, t1, v1)):
            return None
        g = v0 - v1
        o = (v1 - t1) - (v0 - t0)
        gains[k], overfits[k] = g, o
        gain = abs(g) if negative_gain == "abs" else max(g, 0.0)
        raw[k] = gain / max(o * o, OVERFIT_FLOOR)
    total = sum(raw.values())
    if not math.isfinite(total) or total <= 0:
        return None
    return {k: w / total for k, w in raw.items()}, gains, overfits


@register_strategy
class GBlendingStrategy(Strategy):
    """Weighted per-head losses, the weights re-estimated from train/val loss changes."""

    name = "gblending"
    config_class = GBlendingConfig
    default_fusion = "concat"
    config: GBlendingConfig

    def __init__(self, config: GBlendingConfig) -> None:
        super().__init__(config)
        #: the loss weight of each head (modalities, then ``fused``); equal until estimated
        self.weights: dict[str, float] = {}
        #: each head's (train loss, val loss) at the first epoch of the current super-epoch
        self.start: dict[str, tuple[float, float]] | None = None
        #: the last estimate: epoch, G and O per head
        self.estimate: dict[str, Any] | None = None
        self._train_sums: dict[str, float] = {}
        self._train_counts: dict[str, int] = {}
        self._val_losses: dict[str, float] = {}
        self._epoch_weights: dict[str, float] = {}

    @property
    def heads(self) -> tuple[str, ...]:
        """The heads: every modality, then the fused one."""
        return (*self.context.modalities, FUSED)

    def setup(self, ctx: TrainContext) -> None:
        if FUSED in ctx.modalities:
            raise ValueError(
                f"gblending names its fused head {FUSED!r}; rename the modality {FUSED!r}"
            )
        super().setup(ctx)
        if not self.weights:
            self.weights = {k: 1.0 / len(self.heads) for k in self.heads}

    # ------------------------------------------------------------------ training
    def on_epoch_start(self, epoch: int) -> None:
        self._train_sums = {k: 0.0 for k in self.heads}
        self._train_counts = {k: 0 for k in self.heads}
        self._val_losses = {}
        self._epoch_weights = dict(self.weights)

    def head_losses(self, batch: MultimodalBatch) -> tuple[dict[str, torch.Tensor], dict]:
        """Each head's cross-entropy on ``batch`` (with gradients) and its rows."""
        ctx = self.context
        out = ctx.model(batch, with_unimodal=True)
        assert out.unimodal_logits is not None
        rows = {m: batch.present[m] for m in ctx.modalities}
        any_rows = torch.zeros_like(batch.labels, dtype=torch.bool)
        for r in rows.values():
            any_rows |= r
        rows[FUSED] = any_rows
        logits = {**out.unimodal_logits, FUSED: out.logits}
        losses = {k: masked_cross_entropy(logits[k], batch.labels, rows[k]) for k in self.heads}
        return losses, rows

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        losses, rows = self.head_losses(batch)
        loss = torch.stack([self.weights[k] * losses[k] for k in self.heads]).sum()
        ctx.optimizer_step(loss)
        logs = {"loss": float(loss.detach())}
        for k in self.heads:
            value = float(losses[k].detach())
            logs[f"loss_{k}"] = value
            logs[f"w_{k}"] = self.weights[k]
            if bool(rows[k].any()):
                self._train_sums[k] = self._train_sums.get(k, 0.0) + value
                self._train_counts[k] = self._train_counts.get(k, 0) + 1
        return logs

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validation_losses(self, cache: FeatureCache) -> dict[str, float]:
        """Each head's mean cross-entropy on cached (validation) features."""
        model = self.context.model
        names = self.context.modalities
        was_training = model.training
        model.eval()
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in self.heads}
        try:
            for start in range(0, len(cache), EVAL_ROWS):
                rows = slice(start, start + EVAL_ROWS)
                z = {m: cache.z[m][rows] for m in names}
                present = {m: cache.present[m][rows] for m in names}
                parts[FUSED].append(model.fuse(z, present).logits)
                for m, logits in model.unimodal_logits(z).items():
                    parts[m].append(logits)
        finally:
            model.train(was_training)
        any_rows = torch.zeros_like(cache.labels, dtype=torch.bool)
        out = {}
        for m in names:
            rows = cache.present[m]
            any_rows |= rows
            out[m] = _mean_ce(torch.cat(parts[m]), cache.labels, rows)
        out[FUSED] = _mean_ce(torch.cat(parts[FUSED]), cache.labels, any_rows)
        return out

    def prepare_inference(self, cache: FeatureCache) -> None:
        """The loop scores the validation split: keep each head's loss on it."""
        self._val_losses = self.validation_losses(cache)

    def train_losses(self) -> dict[str, float]:
        """Each head's mean training loss over the current epoch's batches (nan: none)."""
        return {
            k: self._train_sums.get(k, 0.0) / n if (n := self._train_counts.get(k, 0)) else math.nan
            for k in self.heads
        }

    def on_epoch_end(self, epoch: int, report: SplitReport) -> None:
        n = self.config.super_epoch
        train = self.train_losses()
        checkpoint = {k: (train[k], self._val_losses.get(k, math.nan)) for k in self.heads}
        position = (epoch - 1) % n
        if position == 0:
            self.start = checkpoint
        if position == n - 1 and self.start is not None:
            result = ogr_weights(self.start, checkpoint, self.config.negative_gain)
            self.estimate = {"epoch": epoch, "updated": result is not None}
            if result is not None:
                self.weights, gains, overfits = result
                self.estimate.update({"gain": gains, "overfit": overfits})
            self.start = None

    def epoch_log(self) -> dict[str, Any]:
        out: dict[str, Any] = {"blend_weights": dict(self._epoch_weights or self.weights)}
        if self.estimate is not None:
            out["blend_estimate"] = dict(self.estimate)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": dict(self.weights),
            "start": None if self.start is None else {k: list(v) for k, v in self.start.items()},
            "estimate": self.estimate,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("weights"):
            self.weights = {k: float(v) for k, v in state["weights"].items()}
        start = state.get("start")
        self.start = (
            None if start is None else {k: (_float(v[0]), _float(v[1])) for k, v in start.items()}
        )
        self.estimate = state.get("estimate")


def _mean_ce(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> float:
    if not bool(rows.any()):
        return math.nan
    return float(F.cross_entropy(logits[rows].float(), labels[rows]))


def _float(value: Any) -> float:
    """A loss from the JSON state (strict JSON stores NaN as null)."""
    return math.nan if value is None else float(value)
