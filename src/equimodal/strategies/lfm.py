"""``lfm``: learning the modality gap dynamically (Yang, Wan, Jiang, Xu, *Facilitating
Multimodal Classification via Dynamically Learning Modality Gap*, NeurIPS 2024).

Sources: the authors' code (github.com/njustkmg/NeurIPS24-LFM), ``Crema_epoch.py`` (the
fitted schedule, the README's command) and ``Crema_epoch_learnable.py`` (the learned
weight), with BalanceBenchmark's port (github.com/GeWu-Lab/BalanceBenchmark),
``LFMTrainer`` in ``balancemm/trainer/LFM_trainer.py`` (defaults in
``configs/trainer_config.yaml``).

Every batch: ``loss = 2 (a_cls CE(f(all), y) + a_align A)`` with ``a_cls + a_align = 1`` and
``A`` the mean over the pairs ``i < j`` of modalities of the official ``Alignment``

``A(p, q) = (KL(m || p) + KL(m || q)) / 2``, ``p = softmax(o_i)``, ``q = softmax(o_j)``,
``m = (p + q) / 2``,

averaged over the batch's rows (``F.kl_div(p.log(), m, 'batchmean')``; note the official
direction ``KL(m || p)``, not the Jensen-Shannon ``KL(p || m)``), ``o_m`` modality ``m``'s
own logits (``model.unimodal_logits``) and ``f(all)`` the fused logits. The weight changes
once per epoch, before its first batch:

- ``schedule: learnable`` (default; BalanceBenchmark, ``Crema_epoch_learnable.py``): on a
  probe batch, ``L_cls = CE`` and ``L = a_cls L_cls + a_align A`` (no factor 2); with ``g``
  the gradient of ``L_cls`` and ``H`` the Hessian of ``L`` over the model's parameters,
  ``h = H g`` (the Hessian-vector product, double backward); ``gamma`` = the mean of
  ``h``'s block of the model's first parameter tensor (the official
  ``hessian_vector_prod[0].mean()``). In 0-based epoch ``e``, first ``lr_alpha`` is halved
  when ``e`` is a non-zero multiple of 20, then ``a_align <- clip(a_align - lr_alpha gamma,
  0.05, 0.95)`` and ``a_cls = 1 - a_align``. Start: ``a_align = 0.95``, ``lr_alpha = 1e-4``.
- ``schedule: fitted`` (``Crema_epoch.py``, ``getAlpha_Learnable_Fitted``): the official
  degree-5 polynomials of the 0-based epoch ``e`` fitted to a learned CREMA-D run,
  ``a_cls(0) = 0.2046`` rising to ``0.92`` at ``e = 199``.

Differences from the official code, and our choices:

- **The starting weight.** The authors' learnable code starts at ``a_cls = 0.05,
  a_align = 0.95`` (and the fitted curve at ``0.20 / 0.80``); BalanceBenchmark starts at
  ``a_cls = 0.95, a_align = 0.05`` (``alpha = {1: 0.05, 0: 0.95}``). equimodal follows the
  authors (``init_align = 0.95``), whose two schedules agree that the alignment leads
  early; ``init_align: 0.05`` is BalanceBenchmark's.
- **The probe batch.** The authors hold 16 training samples out of training and use 8 of
  them; BalanceBenchmark uses a quarter of its first validation batch; both fix the batch
  for the run. A strategy sees no validation inputs, so equimodal uses the first
  ``probe_fraction`` (a quarter) of the rows of each epoch's first training batch, which is
  then trained on. The probe runs in training mode (dropout on), as in both codes.
- **The fitted curve** is held at its last official epoch (``e = 199``) afterwards: the
  polynomial falls below zero by ``e = 230``.
- ``hypergrad: all`` averages ``h`` over every parameter instead of the first tensor.
- **Fusion**: ``late`` by default, the authors' model (one head per modality, CE on the
  mean ``(o_a + o_v) / 2``, ``A`` on the heads' logits); BalanceBenchmark's ``concat``
  (each modality's block of the head plus ``b / M`` as ``o_m``) works too, as does any
  fusion.
- **Missing modalities**: the CE is over rows with any modality, a pair's ``A`` over the
  rows with both, averaged over the pairs that have such rows.

Ours: any number of modalities ``M >= 2`` through the mean over pairs (BalanceBenchmark's
``manual_combinations``; the authors' code has two).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from equimodal.config import StrategyConfig
from equimodal.data.batch import MultimodalBatch
from equimodal.models.model import MultimodalModel
from equimodal.strategies.base import (
    Strategy,
    TrainContext,
    masked_cross_entropy,
    mean_or_zero,
    register_strategy,
)

#: ``getAlpha_Learnable_Fitted`` of ``Crema_epoch.py``: a_cls and a_align, powers 0..5
FITTED_CLS = (
    2.04623704e-01,
    3.35472727e-03,
    1.22989557e-04,
    -2.92947416e-06,
    2.23835486e-08,
    -5.39717505e-11,
)
FITTED_ALIGN = (
    7.95376296e-01,
    -3.35472727e-03,
    -1.22989557e-04,
    2.92947416e-06,
    -2.23835486e-08,
    5.39717505e-11,
)
#: the last 0-based epoch of the official run (200 epochs); the curve is held after it
FITTED_LAST_EPOCH = 199
#: bounds of the learned a_align (``getAlpha_Learnable``)
ALIGN_BOUNDS = (0.05, 0.95)


class LFMConfig(StrategyConfig):
    """Options of ``lfm`` (defaults: the authors' learnable CREMA-D run)."""

    name: Literal["lfm"] = "lfm"
    schedule: Literal["learnable", "fitted"] = Field(
        "learnable",
        description="learnable: the hypergradient step each epoch (BalanceBenchmark, "
        "Crema_epoch_learnable.py); fitted: the official polynomial of the epoch",
    )
    init_align: float = Field(
        0.95,
        ge=ALIGN_BOUNDS[0],
        le=ALIGN_BOUNDS[1],
        description="learnable: starting alignment weight (authors 0.95; BalanceBenchmark 0.05)",
    )
    lr_alpha: float = Field(1e-4, ge=0.0, description="learnable: step size of the weight")
    lr_halve_every: int = Field(
        20, ge=0, description="learnable: halve lr_alpha every this many epochs (0: never)"
    )
    probe_fraction: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description="learnable: share of the epoch's first batch used as the probe batch",
    )
    hypergrad: Literal["first", "all"] = Field(
        "first",
        description="learnable: mean of the Hessian-vector product over the first parameter "
        "tensor (official) or over all parameters",
    )


def alignment(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """The official ``Alignment``: ``(KL(m || p) + KL(m || q)) / 2`` averaged over rows,
    ``p, q`` the softmax of the logits and ``m`` their mean."""
    log_p = torch.log_softmax(p_logits, dim=-1)
    log_q = torch.log_softmax(q_logits, dim=-1)
    m = 0.5 * (log_p.exp() + log_q.exp())
    kl_p = F.kl_div(log_p, m, reduction="batchmean")
    kl_q = F.kl_div(log_q, m, reduction="batchmean")
    return 0.5 * (kl_p + kl_q)


def fitted_weights(epoch: int) -> tuple[float, float]:
    """``(a_cls, a_align)`` of the official fitted schedule at 1-based ``epoch``."""
    e = min(max(epoch - 1, 0), FITTED_LAST_EPOCH)
    a_cls = sum(c * e**i for i, c in enumerate(FITTED_CLS))
    a_align = sum(c * e**i for i, c in enumerate(FITTED_ALIGN))
    return a_cls, a_align


def learnable_step(
    align: float, lr: float, epoch: int, gamma: float, halve_every: int = 20
) -> tuple[float, float]:
    """One epoch's update of ``(a_align, lr_alpha)`` at 1-based ``epoch`` with the
    hypergradient ``gamma``: halve ``lr`` on non-zero multiples of ``halve_every`` (0-based
    epochs), then ``a_align - lr gamma`` clipped to ``[0.05, 0.95]``."""
    e = epoch - 1
    if halve_every and e % halve_every == 0 and e != 0:
        lr = lr / 2
    low, high = ALIGN_BOUNDS
    return max(low, min(high, align - lr * gamma)), lr


def _rows(present: Mapping[str, torch.Tensor], names) -> torch.Tensor:
    names = list(names)
    rows = present[names[0]].clone()
    for m in names[1:]:
        rows = rows | present[m]
    return rows


def lfm_losses(
    model: MultimodalModel, z: Mapping[str, torch.Tensor], batch: MultimodalBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CE(f(all), y), A)``: the fused CE and the mean pairwise alignment of the
    modalities' own logits."""
    ce = masked_cross_entropy(
        model.fuse(z, batch.present).logits, batch.labels, _rows(batch.present, z)
    )
    own = model.unimodal_logits(z)
    terms = []
    for a, b in itertools.combinations(list(z), 2):
        both = batch.present[a] & batch.present[b]
        if bool(both.all()):
            terms.append(alignment(own[a], own[b]))
        elif bool(both.any()):
            terms.append(alignment(own[a][both], own[b][both]))
    return ce, mean_or_zero(terms, ce)


def probe_rows(batch: MultimodalBatch, fraction: float) -> MultimodalBatch:
    """The first ``max(1, floor(fraction * B))`` rows of ``batch``."""
    n = max(1, int(len(batch) * fraction))
    return MultimodalBatch(
        inputs={m: x[:n] for m, x in batch.inputs.items()},
        present={m: p[:n] for m, p in batch.present.items()},
        labels=batch.labels[:n],
        indices=batch.indices[:n],
    )


def hypergradient(
    model: MultimodalModel,
    probe: MultimodalBatch,
    a_cls: float,
    a_align: float,
    which: str = "first",
) -> float:
    """``gamma``: the mean of ``H g`` (``H`` the Hessian of ``a_cls CE + a_align A``, ``g``
    the gradient of ``CE``, both on ``probe``) over the first parameter tensor or all."""
    params = [p for p in model.parameters() if p.requires_grad]
    z = model.encode(probe)
    ce, align = lfm_losses(model, z, probe)
    total = a_cls * ce + a_align * align
    grads = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
    g_cls = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
    outputs, vectors = [], []
    for grad, g, p in zip(grads, g_cls, params, strict=True):
        if grad is not None and grad.requires_grad:
            outputs.append(grad)
            vectors.append(torch.zeros_like(p) if g is None else g.detach())
    if not outputs:
        return 0.0
    hvp = torch.autograd.grad(outputs, params, grad_outputs=vectors, allow_unused=True)
    if which == "first":
        return 0.0 if hvp[0] is None else float(hvp[0].mean())
    flat = [torch.zeros_like(p) if h is None else h for h, p in zip(hvp, params, strict=True)]
    return float(torch.cat([h.reshape(-1) for h in flat]).mean())


@register_strategy
class LFMStrategy(Strategy):
    """Fused CE and unimodal alignment with a per-epoch weight; see the module doc."""

    name = "lfm"
    config_class = LFMConfig
    default_fusion = "late"
    config: LFMConfig

    def __init__(self, config: LFMConfig) -> None:
        super().__init__(config)
        self.epoch = 1
        #: the learned alignment weight a_align (a_cls = 1 - a_align) and its step size
        self.align = config.init_align
        self.lr_alpha = config.lr_alpha
        #: the last epoch whose learnable update ran (0: none yet)
        self.updated_epoch = 0
        #: the last hypergradient gamma (None before the first update)
        self.gamma: float | None = None

    def setup(self, ctx: TrainContext) -> None:
        if len(ctx.modalities) < 2:
            raise ValueError(
                f"lfm aligns pairs of modalities, so it needs 2 or more; this dataset has "
                f"{len(ctx.modalities)}"
            )
        super().setup(ctx)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def weights(self) -> tuple[float, float]:
        """``(a_cls, a_align)`` of the current epoch."""
        if self.config.schedule == "fitted":
            return fitted_weights(self.epoch)
        return 1.0 - self.align, self.align

    def update_weight(self, batch: MultimodalBatch) -> None:
        """The learnable schedule's step of this epoch, on the probe rows of ``batch``."""
        cfg = self.config
        a_cls, a_align = self.weights()
        probe = probe_rows(batch, cfg.probe_fraction)
        self.gamma = hypergradient(self.context.model, probe, a_cls, a_align, cfg.hypergrad)
        self.align, self.lr_alpha = learnable_step(
            self.align, self.lr_alpha, self.epoch, self.gamma, cfg.lr_halve_every
        )
        self.updated_epoch = self.epoch

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        if self.config.schedule == "learnable" and self.updated_epoch < self.epoch:
            self.update_weight(batch)
        a_cls, a_align = self.weights()
        z = ctx.model.encode(batch, ctx.modalities)
        ce, align = lfm_losses(ctx.model, z, batch)
        loss = 2.0 * (a_cls * ce + a_align * align)
        ctx.optimizer_step(loss)
        return {
            "loss": float(loss.detach()),
            "ce": float(ce.detach()),
            "align": float(align.detach()),
            "alpha_cls": a_cls,
        }

    def epoch_log(self) -> dict[str, Any]:
        a_cls, _ = self.weights()
        log: dict[str, Any] = {"alpha_cls": a_cls}
        if self.config.schedule == "learnable":
            log.update(alpha_grad=self.gamma, lr_alpha=self.lr_alpha)
        return log

    def state_dict(self) -> dict[str, Any]:
        return {
            "align": self.align,
            "lr_alpha": self.lr_alpha,
            "updated_epoch": self.updated_epoch,
            "gamma": self.gamma,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.align = float(state.get("align", self.config.init_align))
        self.lr_alpha = float(state.get("lr_alpha", self.config.lr_alpha))
        self.updated_epoch = int(state.get("updated_epoch", 0))
        gamma = state.get("gamma")
        self.gamma = None if gamma is None else float(gamma)
