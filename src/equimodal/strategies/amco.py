"""``amco``: adaptive mask co-optimization (Zhou, Liang, Zheng, Xuan, Kumada, *Adaptive
Mask Co-Optimization for Modal Dependence in Multimodal Learning*, ICASSP 2023), as
BalanceBenchmark implements it.

There is no official code of the paper; the reference is BalanceBenchmark
(github.com/GeWu-Lab/BalanceBenchmark): ``balancemm/trainer/AMCo_trainer.py``
(``train_loop`` L61-83 builds the mask, ``training_step`` L122-159),
``BaseClassifierAMCoModel`` in ``balancemm/models/avclassify_model.py`` (L326-384),
defaults in ``configs/trainer_config.yaml`` (``AMCo``).

State of an epoch (reset at its start): a ramp counter ``l = 0`` and a flag per modality,
"dependent", all False. Each batch of epoch ``e`` (1-based):

1. **Mask ratio**: ``p_t = sin(pi/2 * min(eps, l) / eps)``; then ``l += ramp * (e - 1)``
   (BalanceBenchmark: ``l_t += current_epoch / 10`` on its 0-based epochs, so the first
   epoch never masks and from the second on ``p_t`` reaches 1 within ``eps / (ramp (e-1))``
   batches).
2. **Mask**: ``N = int(p_t * C)`` of the ``C`` class positions, drawn at random, are
   zeros, the others ones; one mask for every row of the batch.
3. **Forward**: each modality's own logits ``u_m = W_m z_m + b / M`` (its block of the
   concat head); a dependent modality's are multiplied by the mask. The fused logits are
   ``sum_m u_m`` with the masked ``u_m`` (for ``concat`` / ``sum`` the model's fused
   logits with the masked entries of the dependent modality's share removed).
4. **Loss** (co-optimization): ``CE(fused, y) + sum_m CE(u_m, y)``, the ``u_m`` masked as in
   the forward pass.
5. **Dependence** for the next batch: the softmax over the concatenation of all the
   modalities' (masked) ``u_m`` of a row; ``share_m`` = the batch mean of the probability
   mass on modality ``m``'s block; ``m`` is dependent when ``share_m > sigma``.

Outside the modulation window the step is plain joint training (``CE(fused, y)``) and the
flags are left as they are. Evaluation never masks. Defaults (``trainer_config.yaml``):
``sigma`` 0.5, ``eps`` 0.3, ``ramp`` 0.1, modulation in the 0-based epochs 0..80, i.e.
``modulation_start`` 1 and ``modulation_end`` 81 here. BalanceBenchmark's ``alpha`` and
``U`` (512) are read but never used.

Differences from BalanceBenchmark, and why:

- **No extra layer.** BalanceBenchmark's AMCo model passes the fused logits through an
  extra ``C x C`` linear layer (``linear_star``) in training and evaluation. A strategy
  here does not change the model, and the paper presents AMCo as a plug-in module, so the
  fused logits are the model's own.
- **One mask for the batch.** BalanceBenchmark builds a ``(2, C)`` mask (two identical
  rows) that its two-GPU ``DataParallel`` scatters into one ``(1, C)`` row per GPU: one mask
  broadcast over every row, which is what equimodal does on any device count.
- **Randomness** comes from the strategy's own ``torch.Generator`` seeded from the run's
  seed and saved in the strategy state (BalanceBenchmark: ``np.random.shuffle``), so runs
  are reproducible and ``--resume`` continues exactly.
- **Missing modalities** (not in BalanceBenchmark): ``CE(u_m)`` is over the rows where
  ``m`` is present; an absent modality's block gets no mass in the dependence softmax
  (its logits are ``-inf``), and ``share_m`` is the mean over the rows with any modality.

Ours: ``mask_on: features`` masks ``N = int(p_t * d)`` of the ``d`` feature positions of
the dependent modality's ``z_m`` instead (same ``p_t``; the fused logits are then the
fusion of the masked features). It is our reading of the paper's unused ``U`` (512, the
width of its features), not BalanceBenchmark's rule. Any number of modalities: the rule
above is written for ``M`` (BalanceBenchmark's loops already are); with ``M`` modalities
the shares still sum to 1, so ``sigma`` 0.5 means "more mass than all the others
together".
"""

from __future__ import annotations

import base64
import math
from typing import Any, Literal

import torch
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


class AMCoConfig(StrategyConfig):
    """Options of ``amco`` (defaults: BalanceBenchmark's ``trainer_config.yaml``)."""

    name: Literal["amco"] = "amco"
    sigma: float = Field(
        0.5, ge=0.0, le=1.0, description="a modality is dependent when its share exceeds this"
    )
    eps: float = Field(0.3, gt=0.0, description="ramp length: p_t = sin(pi/2 min(eps, l)/eps)")
    ramp: float = Field(
        0.1, ge=0.0, description="l grows by ramp * (epoch - 1) per batch (reset each epoch)"
    )
    mask_on: Literal["logits", "features"] = Field(
        "logits",
        description="mask the dependent modality's class logits (BalanceBenchmark) or its "
        "feature positions (ours)",
    )
    modulation_start: int = Field(1, ge=1, description="first masked epoch (1-based)")
    modulation_end: int = Field(
        81, ge=0, description="last masked epoch (1-based, inclusive; BalanceBenchmark 0..80)"
    )


def mask_ratio(l_t: float, eps: float) -> float:
    """``p_t = sin(pi/2 * min(eps, l_t) / eps)``."""
    return math.sin(math.pi / 2 * min(eps, l_t) / eps)


def random_mask(size: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """A float ``(size,)`` vector with ``int(ratio * size)`` zeros at random positions."""
    zeros = int(ratio * size)
    mask = torch.ones(size)
    mask[torch.randperm(size, generator=generator)[:zeros]] = 0.0
    return mask


def dependence_shares(
    logits: dict[str, torch.Tensor], present: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Per modality, the batch mean of the softmax mass on its block of the row's
    concatenated logits (absent modalities get none); rows with no modality are left out."""
    names = list(logits)
    blocks = [logits[m].masked_fill(~present[m].unsqueeze(1), float("-inf")) for m in names]
    rows = any_present(present, names)
    if not bool(rows.any()):
        return {m: 0.0 for m in names}
    probs = torch.softmax(torch.cat(blocks, 1)[rows], 1)
    mass = probs.reshape(probs.shape[0], len(names), -1).sum(2).mean(0)
    return {m: float(mass[k]) for k, m in enumerate(names)}


@register_strategy
class AMCoStrategy(Strategy):
    """Joint plus unimodal losses, the dependent modality's logits masked (AMCo)."""

    name = "amco"
    config_class = AMCoConfig
    default_fusion = "concat"
    fusions = ("concat", "sum")
    config: AMCoConfig

    def __init__(self, config: AMCoConfig) -> None:
        super().__init__(config)
        self.epoch = 0
        #: the ramp counter l_t of the current epoch
        self.ramp_count = 0.0
        #: the dependent flags of the current epoch (decided on the previous batch)
        self.dependent: dict[str, bool] = {}
        #: the masks' random stream (seeded in setup, saved in the state)
        self.generator = torch.Generator()
        self._restored = False

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        if not self._restored:
            self.generator.manual_seed(ctx.seed * 1_000_003 + 104_729)
        self.dependent = {m: self.dependent.get(m, False) for m in ctx.modalities}

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        self.ramp_count = 0.0
        self.dependent = {m: False for m in self.context.modalities}

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        model, cfg = ctx.model, self.config
        ratio = mask_ratio(self.ramp_count, cfg.eps)
        self.ramp_count += cfg.ramp * (self.epoch - 1)
        size = ctx.num_classes if cfg.mask_on == "logits" else model.dim
        mask = random_mask(size, ratio, self.generator)
        z = model.encode(batch)
        rows = any_present(batch.present)
        if not cfg.modulation_start <= self.epoch <= cfg.modulation_end:
            fused = model.fuse(z, batch.present).logits
            loss = masked_cross_entropy(fused, batch.labels, rows)
            ctx.optimizer_step(loss)
            return {"loss": float(loss.detach())}
        dependent = [m for m in ctx.modalities if self.dependent.get(m, False)]
        if cfg.mask_on == "features":
            for m in dependent:
                z[m] = z[m] * mask.to(z[m])
            fused = model.fuse(z, batch.present).logits
            unimodal = model.unimodal_logits(z)
        else:
            fused = model.fuse(z, batch.present).logits
            unimodal = model.unimodal_logits(z)
            for m in dependent:
                mk = mask.to(unimodal[m])
                share = unimodal[m] * (1.0 - mk) * batch.present[m].unsqueeze(1).to(mk)
                fused = fused - share  # the masked entries leave the fused logits
                unimodal[m] = unimodal[m] * mk
        fused_loss = masked_cross_entropy(fused, batch.labels, rows)
        uni_losses = {
            m: masked_cross_entropy(unimodal[m], batch.labels, batch.present[m])
            for m in ctx.modalities
        }
        loss = fused_loss + sum(uni_losses.values())
        ctx.optimizer_step(loss)
        with torch.no_grad():
            shares = dependence_shares({m: v.detach() for m, v in unimodal.items()}, batch.present)
        logs = {"loss": float(loss.detach()), "loss_fused": float(fused_loss.detach())}
        logs["mask_ratio"] = float(1.0 - mask.mean()) if dependent else 0.0
        for m in ctx.modalities:
            logs[f"loss_{m}"] = float(uni_losses[m].detach())
            logs[f"share_{m}"] = shares[m]
            logs[f"masked_{m}"] = float(m in dependent)
        self.dependent = {m: shares[m] > cfg.sigma for m in ctx.modalities}
        return logs

    def state_dict(self) -> dict[str, Any]:
        state = self.generator.get_state().numpy().tobytes()
        return {
            "epoch": self.epoch,
            "ramp_count": self.ramp_count,
            "dependent": dict(self.dependent),
            "generator": base64.b64encode(state).decode("ascii"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", self.epoch))
        self.ramp_count = float(state.get("ramp_count", self.ramp_count))
        self.dependent = {m: bool(v) for m, v in state.get("dependent", {}).items()}
        if state.get("generator") is not None:
            raw = bytearray(base64.b64decode(state["generator"]))
            self.generator.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())
            self._restored = True
