"""``greedy``: balanced multi-modal learning against the greedy learner (Wu, Jastrzebski,
Cho, Geras, *Characterizing and Overcoming the Greedy Nature of Learning in Multi-modal
Deep Neural Networks*, ICML 2022).

Source: the official implementation (github.com/nyukat/greedy_multimodal_learning):
``Bias_Mitigation_Strong`` in ``src/callbacks.py`` (the schedule and the conditional
learning speed), ``MMTM_mitigate`` in ``src/balanced_mmtm.py`` and ``MMTM_MVCNN`` in
``src/model.py`` (the model), ``blend_loss`` in ``train.py`` (the loss), the defaults of
``configs/training_guided.gin``; BalanceBenchmark's ``balancemm/trainer/Greedy_trainer.py``
is a port of the same rule. The model is the fusion ``mmtm``
(:mod:`equimodal.models.greedy_fusion`): one branch and head per modality, each branch
gated by an MMTM block that reads every modality.

Each batch:

- **Loss**: ``sum_m CE(logits_m, y)`` over the branches (official ``blend_loss``); the
  prediction is the mean of the branches' logits.
- **Conditional learning speed** (after the backward pass, before the optimizer step): for
  every modality ``m``, ``mu(P) = sum_P ||grad||^2 / sum_P ||theta||^2`` of its *main*
  parameters (encoder, projection, head: the official ``net_view_m``) and of its *bypass*
  (the squeeze layer shared by all and the excitation into branch ``m``: the official
  ``mmtm`` parameters); both are summed over the run's steps (``M_main_m``, ``M_bypass_m``)
  and ``BDR_m = log10(M_bypass_m / M_main_m)``.
- **Schedule**: from epoch ``start_epoch`` (2) on, a regular step whose imbalance
  ``max_m BDR_m - min_m BDR_m`` (two modalities: ``|BDR_0 - BDR_1|``) exceeds
  ``threshold`` (0.01) starts ``window`` (5) re-balancing steps for the modality with the
  largest ``BDR`` (the branch that learns most from the others). Re-balancing steps do not
  measure the speed; the step after them is regular again. Before ``start_epoch`` the
  speed is accumulated but nothing is re-balanced.
- **Re-balancing step** for modality ``c``: the gate of ``c``'s branch is its running
  average (``rebalance``), so branch ``c`` learns from ``c`` alone (no gradient reaches its
  excitation); the loss is the same sum over branches (``rebalance_loss: all``, official),
  or only ``CE(logits_c, y)`` with ``rebalance_loss: cared``, which updates nothing but
  branch ``c`` (encoder, projection, head).
- **Conditional utilisation rates** (analysis, every validation pass): branch ``m``'s
  accuracy with its cross-modal connection (``A_m``) and isolated from the other
  modalities, their squeezes replaced by the validation means (``A'_m``):
  ``u(rest | m) = (A_m - A'_m) / A_m`` (the paper's ``u(m_1 | m_0)`` for branch 0), in the
  epoch log as ``utilisation``, with ``learning_speed`` (``BDR_m``).

Differences from the official code, and why:

- The block sits on the projected features ``z_m`` (vectors), not between ResNet stages;
  squeezing is the identity. Each branch is ``z_m`` gated, then its head.
- The official block tracks the second modality's running gate with the first one's values
  and also updates the averages in evaluation passes; here each modality tracks its own
  gate in training passes only (see the fusion).
- The official evaluation passes use whatever ``curation_mode`` the last training batch
  left; equimodal predicts with every connection on.
- For the utilisation rate the official code replaces the other modality's squeeze by its
  mean over the training split (recorded in a separate pass of the final model);
  equimodal uses the mean over the validation split of the same model (no training pass
  at validation time). It is an analysis quantity: training does not read it.
- Parameters without a gradient (a modality absent from the whole batch) count as zero
  gradient (the official code would fail). While a sum is still zero the speed is
  undefined and no re-balancing starts.
- Model, optimizer and schedule are equimodal's (the official: SGD, lr 0.1, ResNet-18s);
  the loop's gradient clipping acts after the speed is measured.

Ours: **any number of modalities** (the official code has two): every modality has a
branch, the imbalance is the spread of the ``BDR_m`` and the cared modality the one with
the largest; for two modalities this is the official rule. Rows missing a modality leave
its branch out of the loss (and of the prediction), and its squeeze is the running mean in
the others' gates.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

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

if TYPE_CHECKING:
    from equimodal.engine.validation import FeatureCache


class GreedyConfig(StrategyConfig):
    """Options of ``greedy`` (defaults: ``configs/training_guided.gin``)."""

    name: Literal["greedy"] = "greedy"
    threshold: float = Field(
        0.01,
        ge=0.0,
        description="re-balance when max BDR - min BDR exceeds this (official epsilon 0.01)",
    )
    window: int = Field(
        5, ge=1, description="re-balancing steps once triggered (official curation_windowsize)"
    )
    start_epoch: int = Field(
        2, ge=1, description="first epoch (1-based) that may re-balance (official starting_epoch)"
    )
    rebalance_loss: Literal["all", "cared"] = Field(
        "all",
        description="loss of a re-balancing step: every branch (official) or only the cared one",
    )


def speed_ratio(params: list[torch.nn.Parameter]) -> float:
    """``sum ||grad||^2 / sum ||theta||^2`` over ``params`` (a missing gradient counts 0)."""
    weight = sum(float((p.detach() ** 2).sum()) for p in params)
    grad = sum(float((p.grad.detach() ** 2).sum()) for p in params if p.grad is not None)
    return grad / weight if weight > 0 else 0.0


def learning_speed(main: dict[str, float], bypass: dict[str, float]) -> dict[str, float] | None:
    """``BDR_m = log10(bypass_m / main_m)`` of the accumulated speeds (None while a sum is 0)."""
    if any(main[m] <= 0 or bypass[m] <= 0 for m in main):
        return None
    return {m: math.log10(bypass[m] / main[m]) for m in main}


def imbalance(bdr: dict[str, float]) -> tuple[float, str]:
    """``max_m BDR_m - min_m BDR_m`` and the modality with the largest (first on ties)."""
    top = max(bdr, key=lambda m: bdr[m])
    return bdr[top] - min(bdr.values()), top


def utilisation_rate(
    on: torch.Tensor, off: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor
) -> float:
    """``(A_on - A_off) / A_on``: accuracies of a branch's logits with its cross-modal
    connection (``on``) and without (``off``) over ``rows`` (0 when ``A_on`` is 0)."""
    if not bool(rows.any()):
        return 0.0
    y = labels[rows]
    acc_on = float((on[rows].argmax(1) == y).float().mean())
    acc_off = float((off[rows].argmax(1) == y).float().mean())
    return (acc_on - acc_off) / acc_on if acc_on > 0 else 0.0


@register_strategy
class GreedyStrategy(Strategy):
    """Balanced multi-modal learning (conditional learning speed); see the module doc."""

    name = "greedy"
    config_class = GreedyConfig
    default_fusion = "mmtm"
    fusions = ("mmtm",)
    config: GreedyConfig

    def __init__(self, config: GreedyConfig) -> None:
        super().__init__(config)
        #: accumulated speeds of the main and bypass parameters (official M_main, M_bypass)
        self.speed_main: dict[str, float] = {}
        self.speed_bypass: dict[str, float] = {}
        self.unlocked = False
        #: True while re-balancing (official curation_mode); ``caring`` is the modality
        self.rebalancing = False
        self.caring: str | None = None
        self.rebalance_step = 0
        self.bdr: dict[str, float] = {}
        self.gap = 0.0
        self.utilisation: dict[str, float] = {}

    def setup(self, ctx: TrainContext) -> None:
        if len(ctx.modalities) < 2:
            raise ValueError(
                f"strategy greedy needs at least 2 modalities; this dataset has "
                f"{len(ctx.modalities)}"
            )
        super().setup(ctx)
        for m in ctx.modalities:
            self.speed_main.setdefault(m, 0.0)
            self.speed_bypass.setdefault(m, 0.0)

    def on_epoch_start(self, epoch: int) -> None:
        self.unlocked = epoch >= self.config.start_epoch

    # ------------------------------------------------------------------ training
    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        model = ctx.model
        cared = self.caring if self.rebalancing else None
        z = model.encode(batch)
        kwargs = {"rebalance": cared} if cared is not None else {}
        out = model.fuse(z, batch.present, fusion_kwargs=kwargs)
        branch = out.branch_logits  # type: ignore[attr-defined]
        if cared is not None and self.config.rebalance_loss == "cared":
            names = [cared]
        else:
            names = list(branch)
        losses = {m: masked_cross_entropy(branch[m], batch.labels, batch.present[m]) for m in names}
        loss = torch.stack(list(losses.values())).sum()
        ctx.optimizer_step(loss, self.after_backward)
        logs = {"loss": float(loss.detach()), "gap": self.gap}
        logs.update({f"loss_{m}": float(v.detach()) for m, v in losses.items()})
        logs.update({f"rebalance_{m}": float(m == cared) for m in ctx.modalities})
        return logs

    def after_backward(self) -> None:
        """The official ``on_backward_end``: measure the speed in a regular step and start
        or count re-balancing steps (they apply from the next batch on)."""
        if not self.unlocked:
            self.measure()
            self.rebalancing = False
            return
        if self.rebalancing:
            self.rebalance_step += 1
            if self.rebalance_step >= self.config.window:
                self.rebalancing = False
            return
        measured = self.measure()
        if measured is not None and measured[0] > self.config.threshold:
            self.rebalancing, self.caring, self.rebalance_step = True, measured[1], 0
        else:
            self.rebalancing = False

    def measure(self) -> tuple[float, str] | None:
        """Add this step's speeds to the sums; the imbalance and the modality to care for."""
        model = self.context.model
        for m in self.context.modalities:
            self.speed_main[m] += speed_ratio(model.modality_parameters(m, with_head=True))
            self.speed_bypass[m] += speed_ratio(self.context.model.cross_modal_parameters(m))
        bdr = learning_speed(self.speed_main, self.speed_bypass)
        if bdr is None:
            return None
        self.bdr = bdr
        self.gap, top = imbalance(bdr)
        return self.gap, top

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def prepare_inference(self, cache: FeatureCache) -> None:
        """Conditional utilisation rates ``u(rest | m)`` on the validation features."""
        model = self.context.model
        reference = {}
        for m, z in cache.z.items():
            rows = cache.present[m]
            reference[m] = z[rows].mean(0) if bool(rows.any()) else torch.zeros_like(z[0])
        was_training = model.training
        model.eval()
        try:
            on = model.fuse(cache.z, cache.present, fusion_kwargs={"track": False})
            self.utilisation = {}
            for m in model.modalities:
                off = model.fuse(
                    cache.z,
                    cache.present,
                    fusion_kwargs={"isolate": [m], "reference": reference, "track": False},
                )
                self.utilisation[m] = utilisation_rate(
                    on.branch_logits[m],  # type: ignore[attr-defined]
                    off.branch_logits[m],  # type: ignore[attr-defined]
                    cache.labels,
                    cache.present[m],
                )
        finally:
            model.train(was_training)

    def epoch_log(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.utilisation:
            out["utilisation"] = dict(self.utilisation)
        if self.bdr:
            out["learning_speed"] = dict(self.bdr)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "speed_main": dict(self.speed_main),
            "speed_bypass": dict(self.speed_bypass),
            "unlocked": self.unlocked,
            "rebalancing": self.rebalancing,
            "caring": self.caring,
            "rebalance_step": self.rebalance_step,
            "bdr": dict(self.bdr),
            "gap": self.gap,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.speed_main = {m: float(v) for m, v in state.get("speed_main", {}).items()}
        self.speed_bypass = {m: float(v) for m, v in state.get("speed_bypass", {}).items()}
        self.unlocked = bool(state.get("unlocked", False))
        self.rebalancing = bool(state.get("rebalancing", False))
        self.caring = state.get("caring")
        self.rebalance_step = int(state.get("rebalance_step", 0))
        self.bdr = {m: float(v) for m, v in state.get("bdr", {}).items()}
        self.gap = float(state.get("gap", 0.0))
