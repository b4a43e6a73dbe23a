"""``pmr``: prototypical modal rebalance (Fan, Xu, Wei, Hu, Cao, CVPR 2023).

Source: the paper (Eqs. 6-13, Algorithm 1) and the official code
(github.com/fanyunfeng-bit/Modal-Imbalance-PMR, ``main_Prototype_grad.py``: ``train_epoch``
and ``calculate_prototype``), with BalanceBenchmark's port
(github.com/GeWu-Lab/BalanceBenchmark, ``balancemm/trainer/PMR_trainer.py``).

Each modality ``m`` keeps one **prototype** per class, ``c^m_k``, the mean of its features
``z_m`` over the training rows of class ``k``, refreshed once per epoch with momentum
``c <- eps c_old + (1 - eps) c_new`` (Eq. 12). Each batch:

- **Prototypical classifier** (Eq. 7): ``p^m_i = softmax_k(-||z^m_i - c^m_k||)``, the
  Euclidean distance, prototypes detached.
- **Scores and ratio** (Eq. 8): ``s_m`` = the batch mean of ``p^m_i[y_i]`` (no gradient);
  ``rho_m = s_m / mean_{k != m} s_k`` (for two modalities the paper's ``rho_t`` and its
  inverse).
- **Coefficients** (Eq. 11): the slow modality's PCE weight
  ``beta_m = clip(1/rho_m - 1, 0, 1)`` and the dominant modality's entropy weight
  ``gamma_m = clip(rho_m - 1, 0, 1)`` (each 0 on the other side of 1). For two modalities
  this is Eq. 11 exactly: ``beta = clip(1/rho - 1)``, ``gamma = clip(rho - 1)``, with the
  entropy term of each modality weighted by the other's PCE weight (Eq. 13).
- **Loss** (Eqs. 10, 13):
  ``CE(fused, y) + alpha sum_m beta_m PCE_m - mu sum_m gamma_m H_m``, with
  ``PCE_m = mean_i -log p^m_i[y_i]`` and ``H_m`` the batch mean of the entropy of
  ``p^m_i``; the entropy term only in epochs ``1..entropy_epochs`` (the paper's ``E_r``).
  The prototype terms act in epochs ``modulation_start..modulation_end`` (the official
  loop's window); outside it the loss is the fused cross-entropy alone.

Options (defaults): ``alpha`` 1 (official default; the paper uses 1 or 2), ``mu`` 0.01 (the
paper: 1e-2 or 1e-3), ``momentum`` (``eps``) 0.2 (the official default), the window 1..101
(the official 0-based ``0 <= epoch <= 100``), ``entropy_epochs`` 10 (ours: the paper says
"the first few epochs" and gives no number), ``coefficients`` ``paper`` (Eq. 11) or
``binary`` (the released code: weight 1 for the slower modality, 0 otherwise).

Differences from the official code, and our choices:

- **Coefficients and PER.** The released code (and BalanceBenchmark's two-modality path)
  uses a fixed PCE weight ``alpha`` on the slower modality and has no entropy term;
  equimodal follows the paper (Eq. 11 coefficients, Eq. 13 entropy term), the method as
  published, which the paper's ablation credits for part of the gain. ``coefficients:
  binary`` with ``mu: 0`` is the released code's rule.
- **Where the prototypes come from.** The official code computes them before each epoch
  with a separate evaluation-mode pass over the first tenth of the training batches
  (over the validation set for AVE and CG-MNIST). A strategy never sees the training set
  outside its batches, so equimodal accumulates the class sums of the (detached,
  training-mode) features of every training batch of epoch ``e`` and turns them into the
  prototypes of epoch ``e + 1``: the same class means, of all the epoch's rows instead of
  a tenth, from features computed while the epoch trained. The validation set is never
  used (it selects the model).
- **The first epoch** has no earlier epoch: its prototypes are the running class means of
  the features seen so far in epoch 1, this batch included (so every label of the batch
  has a prototype); the official code uses the untrained model's features instead.
- A class absent from an epoch keeps its previous prototype; a class with no prototype yet
  is left out of the prototypical softmax, and rows of that class out of the PCE, score and
  entropy. The official code divides by a zero count (NaN prototypes).
- **Missing modalities**: rows missing modality ``m`` take no part in ``m``'s prototypes,
  score, PCE or entropy; ``s_m`` is a mean over ``m``'s present rows, not a sum, so two
  modalities present in different numbers of rows compare fairly (with every row present
  the ratio is the official ratio of sums).
- **Any number of modalities** (ours): the ratio against the mean of the others (as
  ``ogm_ge``), the coefficients above. BalanceBenchmark's three-modality path drops the
  prototype losses for OGM-style gradient scaling; equimodal keeps PMR's losses.
- Model, optimizer and schedule are equimodal's (the run's config); the prototypes are
  those of the features ``z_m`` the fusion reads.
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


class PMRConfig(StrategyConfig):
    """Options of ``pmr`` (defaults: the official code's where it has them)."""

    name: Literal["pmr"] = "pmr"
    alpha: float = Field(
        1.0, ge=0.0, description="alpha: weight of the prototypical cross-entropy (paper: 1 or 2)"
    )
    mu: float = Field(
        0.01,
        ge=0.0,
        description="mu: weight of the prototypical entropy regularisation (paper: 1e-2 or 1e-3)",
    )
    entropy_epochs: int = Field(
        10,
        ge=0,
        description="E_r: the entropy term acts in epochs 1..E_r (ours: the paper gives none)",
    )
    momentum: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="eps: prototypes <- eps * old + (1 - eps) * new each epoch (official: 0.2)",
    )
    modulation_start: int = Field(1, ge=1, description="first epoch (1-based) of the PMR terms")
    modulation_end: int = Field(
        101, ge=0, description="last epoch (1-based) of the PMR terms (official: 0-based 100)"
    )
    coefficients: Literal["paper", "binary"] = Field(
        "paper",
        description="'paper': Eq. 11 clip(1/rho - 1) / clip(rho - 1); 'binary': 1 for the "
        "slower / faster modality, as the released code's PCE weight",
    )


def prototype_logits(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``-||z_i - c_k||`` for every row ``i`` and prototype ``k``: ``(B, K)``."""
    diff = z.unsqueeze(1) - prototypes.to(z.dtype).unsqueeze(0)
    return -diff.pow(2).sum(-1).clamp_min(1e-12).sqrt()


def prototypical_cross_entropy(
    z: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``PCE`` (Eq. 9): the batch mean of ``-log softmax_k(-||z - c_k||)[y]``."""
    return F.cross_entropy(prototype_logits(z, prototypes), labels)


def prototypical_entropy(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``H`` (Eq. 13): the batch mean of the entropy of ``softmax_k(-||z - c_k||)``."""
    logp = F.log_softmax(prototype_logits(z, prototypes), dim=1)
    return -(logp.exp() * logp).sum(1).mean()


def imbalance_ratios(scores: dict[str, float]) -> dict[str, float]:
    """``rho_m = s_m / mean_{k != m} s_k`` (``s_0 / s_1`` and its inverse for two)."""
    ratios = {}
    for m, s in scores.items():
        others = [v for k, v in scores.items() if k != m]
        ratios[m] = s / max(sum(others) / len(others), 1e-12) if others else 1.0
    return ratios


def pmr_coefficients(
    scores: dict[str, float], rule: str = "paper"
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """``(rho_m, beta_m, gamma_m)``: the ratio, the PCE weight and the entropy weight.

    ``paper`` (Eq. 11): ``beta_m = clip(1/rho_m - 1, 0, 1)`` for ``rho_m < 1``,
    ``gamma_m = clip(rho_m - 1, 0, 1)`` for ``rho_m > 1``; ``binary`` (the released code):
    1 instead of the clipped value.
    """
    ratios = imbalance_ratios(scores)
    beta, gamma = {}, {}
    for m, rho in ratios.items():
        if rule == "binary":
            beta[m] = 1.0 if rho < 1 else 0.0
            gamma[m] = 1.0 if rho > 1 else 0.0
        else:
            beta[m] = min(max(1.0 / max(rho, 1e-12) - 1.0, 0.0), 1.0) if rho < 1 else 0.0
            gamma[m] = min(max(rho - 1.0, 0.0), 1.0) if rho > 1 else 0.0
    return ratios, beta, gamma


@register_strategy
class PMRStrategy(Strategy):
    """Joint training plus prototypical CE for slow and entropy for dominant modalities."""

    name = "pmr"
    config_class = PMRConfig
    default_fusion = "concat"
    config: PMRConfig

    def __init__(self, config: PMRConfig) -> None:
        super().__init__(config)
        self.epoch = 0
        #: per modality: the prototypes ``(C, d)`` in use (float64) and which classes have one
        self.prototypes: dict[str, torch.Tensor] = {}
        self.known: dict[str, torch.Tensor] = {}
        #: per modality: class sums ``(C, d)`` and counts ``(C,)`` of this epoch's features
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ set-up
    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        device = next(ctx.model.parameters()).device
        shape = (ctx.num_classes, ctx.model.dim)
        for m in ctx.modalities:
            if m not in self.sums:
                self.sums[m] = torch.zeros(shape, dtype=torch.float64, device=device)
                self.counts[m] = torch.zeros(shape[0], dtype=torch.float64, device=device)
                self.prototypes[m] = torch.zeros(shape, dtype=torch.float64, device=device)
                self.known[m] = torch.zeros(shape[0], dtype=torch.bool, device=device)

    @property
    def bootstrapping(self) -> bool:
        """True until the first epoch's prototypes are final (the running means serve)."""
        return not any(bool(k.any()) for k in self.known.values())

    def on_epoch_start(self, epoch: int) -> None:
        """Turn the last epoch's class sums into prototypes (Eq. 12), then start anew."""
        self.epoch = epoch
        if not any(bool(c.any()) for c in self.counts.values()):
            return
        eps = self.config.momentum
        for m, counts in self.counts.items():
            seen = counts > 0
            new = self.sums[m][seen] / counts[seen].unsqueeze(1)
            old = self.prototypes[m][seen]
            blend = torch.where(self.known[m][seen].unsqueeze(1), eps * old + (1 - eps) * new, new)
            self.prototypes[m][seen] = blend
            self.known[m] |= seen
            self.sums[m].zero_()
            counts.zero_()

    # ------------------------------------------------------------------ training
    def accumulate(self, features: dict[str, torch.Tensor], batch: MultimodalBatch) -> None:
        """Add the present rows' detached features to this epoch's class sums."""
        for m, z in features.items():
            rows = batch.present[m]
            if not bool(rows.any()):
                continue
            labels = batch.labels[rows]
            self.sums[m].index_add_(0, labels, z.detach()[rows].to(torch.float64))
            self.counts[m].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))

    def current_prototypes(self, m: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Modality ``m``'s prototypes in use and the mask of classes that have one."""
        if self.bootstrapping:  # epoch 1: running class means so far, this batch included
            seen = self.counts[m] > 0
            means = torch.zeros_like(self.sums[m])
            means[seen] = self.sums[m][seen] / self.counts[m][seen].unsqueeze(1)
            return means, seen
        return self.prototypes[m], self.known[m]

    def in_window(self) -> bool:
        cfg = self.config
        return cfg.modulation_start <= self.epoch <= cfg.modulation_end

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        out = ctx.model(batch)
        rows = any_present(batch.present)
        ce = masked_cross_entropy(out.logits, batch.labels, rows)
        self.accumulate(out.features, batch)
        logs = {"loss_ce": float(ce.detach())}
        if not self.in_window():
            ctx.optimizer_step(ce)
            logs["loss"] = logs["loss_ce"]
            return logs
        cfg = self.config
        terms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # m -> (PCE, entropy)
        scores: dict[str, float] = {}
        for m in ctx.modalities:
            prototypes, known = self.current_prototypes(m)
            # rows present in m whose class has a prototype; labels re-indexed to known ones
            index = torch.cumsum(known.long(), 0) - 1
            use = batch.present[m] & known[batch.labels]
            if not bool(use.any()):
                continue
            logits = prototype_logits(out.features[m][use], prototypes[known])
            labels = index[batch.labels[use]]
            logp = F.log_softmax(logits, dim=1)
            pce = F.nll_loss(logp, labels)
            entropy = -(logp.exp() * logp).sum(1).mean()
            terms[m] = (pce, entropy)
            scores[m] = float(logp.detach().exp().gather(1, labels[:, None]).mean())
        if len(scores) < 2:  # nothing to compare: joint training
            ctx.optimizer_step(ce)
            logs["loss"] = logs["loss_ce"]
            return logs
        ratios, beta, gamma = pmr_coefficients(scores, cfg.coefficients)
        loss = ce
        regularise = self.epoch <= cfg.entropy_epochs and cfg.mu > 0
        for m, (pce, entropy) in terms.items():
            if beta[m] > 0 and cfg.alpha > 0:
                loss = loss + cfg.alpha * beta[m] * pce
            if regularise and gamma[m] > 0:
                loss = loss - cfg.mu * gamma[m] * entropy
            logs[f"pce_{m}"] = float(pce.detach())
            logs[f"entropy_{m}"] = float(entropy.detach())
            logs[f"rho_{m}"] = ratios[m]
            logs[f"beta_{m}"] = beta[m]
            logs[f"gamma_{m}"] = gamma[m] if regularise else 0.0
        ctx.optimizer_step(loss)
        logs["loss"] = float(loss.detach())
        return logs

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Prototypes, their class mask and this epoch's sums, as JSON lists (exact)."""
        return {
            "prototypes": {m: p.cpu().tolist() for m, p in self.prototypes.items()},
            "known": {m: k.cpu().tolist() for m, k in self.known.items()},
            "sums": {m: s.cpu().tolist() for m, s in self.sums.items()},
            "counts": {m: c.cpu().tolist() for m, c in self.counts.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = next(self.ctx.model.parameters()).device if self.ctx is not None else "cpu"

        def tensors(key: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
            return {
                m: torch.tensor(v, dtype=dtype, device=device)
                for m, v in state.get(key, {}).items()
            }

        for key, dtype, target in (
            ("prototypes", torch.float64, self.prototypes),
            ("known", torch.bool, self.known),
            ("sums", torch.float64, self.sums),
            ("counts", torch.float64, self.counts),
        ):
            target.update(tensors(key, dtype))
