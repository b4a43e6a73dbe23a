"""``opm``: on-the-fly prediction modulation (Wei, Hu, Du, Wen, *On-the-fly Modulation for
Balanced Multimodal Learning*, IEEE TPAMI 2024/2025, the journal extension of OGM-GE).

Official code: github.com/GeWu-Lab/BML_TPAMI2024, ``code/models/Classifier.py``
(``calcu_q`` L58-72, ``Modality_drop.execute_drop`` L31-55, ``custom_autograd`` L9-21,
``Classifier.forward`` L108-149) with the loop ``train`` of ``code/main.py`` (L77-115),
defaults in ``code/config.py`` and ``code/scripts/train_opm.sh``. BalanceBenchmark's port:
github.com/GeWu-Lab/BalanceBenchmark, ``balancemm/trainer/OPM_trainer.py``.

Each batch (after the warm-up):

1. ``s_m`` = sum over the batch (rows where ``m`` is present) of the softmax probability of
   the true class from modality ``m``'s own logits (its block of the head plus ``b / M``,
   the official ``t1 = out_1 W[:, :512]^T + b / 2`` with detached weights).
2. ``rho_m = s_m / mean_{k != m} s_k`` (for two modalities the official
   ``performance_1 / performance_2``) and the drop probability
   ``q_m = clip(q_base (1 + lambda tanh(relu(rho_m - 1))), 0, 1)`` when
   ``tanh(relu(rho_m - 1)) > 0``, else ``q_m = 0``: a modality that does not lead is never
   dropped.
3. With probability ``p_exe`` (one draw per batch) the drop is executed: every row keeps
   modality ``m`` with probability ``1 - q_m``, independently over rows and modalities;
   every feature ``z_m`` (kept or not, of every modality) is multiplied by its keep mask
   and divided by ``1 - theta``, ``theta = sum_m d_m q_m / sum_m d_m`` (``= mean_m q_m``:
   every ``z_m`` has the model's width); the gradient sees the same scaling (the official
   ``custom_autograd`` is a division by a constant). Rows that keep no modality leave the
   batch; a batch that keeps no row takes no optimizer step (official ``continue``).
4. Loss: ``CE(fused logits of the kept rows, y)``; the unimodal losses the official loop
   computes are only logged there, and take no part in the gradient.

Evaluation never drops. Defaults: ``q_base`` 0.5, ``lam`` 0.5, ``p_exe`` 0.7 (the
official ``scripts/train_opm.sh``; ``config.py`` and BalanceBenchmark have ``q_base``
0.4); the official loop drops from its 0-based epoch 6 on (``warm_up = 1 if epoch <= 5``),
i.e. ``modulation_start`` 7 here (1-based), with no end (``modulation_end`` null).

Differences from the official code, and why:

- **Dropped features are zeros** in the fused input, as in the official code. equimodal's
  ``concat`` fusion fills an *absent* modality with a learned embedding; a dropped one is
  not absent but zeroed (the official ``torch.mul(feature, mask)``), so only the
  ``concat`` and ``sum`` fusions, where a zero block / summand is exactly "no
  contribution", are offered.
- **Randomness** comes from the strategy's own ``torch.Generator`` seeded from the run's
  seed and saved in the strategy state (the official code uses NumPy's and torch's global
  generators), so runs are reproducible and ``--resume`` continues exactly.
- **Missing modalities** (not in the official code): ``s_m`` sums over the rows where
  ``m`` is present; a row leaves the loss when none of its *present* modalities is kept
  (the official rule "no modality kept" on complete data).
- The official ``execute_drop`` has a stray ``]`` (L53, a syntax error as released);
  BalanceBenchmark's port runs, adds ``1e-5`` to the ratio's and ``1 - theta``'s
  denominators (omitted here: ``theta < 1`` always, as the weakest modality is never
  dropped) and, for three modalities, divides ``s_m`` by the *sum* of the others.
- Model, optimizer and schedule are equimodal's (the run's config).

Ours: any number of modalities, through ``rho_m = s_m / mean_{k != m} s_k`` (as in
equimodal's ``ogm_ge``; BalanceBenchmark's three-modality port uses the sum of the
others, with which at most one modality can ever lead).
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


class OPMConfig(StrategyConfig):
    """Options of ``opm`` (defaults: the official ``scripts/train_opm.sh``)."""

    name: Literal["opm"] = "opm"
    q_base: float = Field(
        0.5, ge=0.0, le=1.0, description="base drop probability of a leading modality"
    )
    lam: float = Field(
        0.5, ge=0.0, description="lambda: how much the lead raises the drop probability"
    )
    p_exe: float = Field(
        0.7, ge=0.0, le=1.0, description="probability that a batch's drop is executed"
    )
    modulation_start: int = Field(
        7, ge=1, description="first epoch (1-based) that drops; official warm-up: 6 epochs"
    )
    modulation_end: int | None = Field(
        None, ge=1, description="last epoch (1-based, inclusive) that drops; null: no end"
    )


def drop_probabilities(
    scores: dict[str, float], q_base: float, lam: float
) -> tuple[dict[str, float], dict[str, float]]:
    """``(rho_m, q_m)`` from the modalities' summed true-class probabilities ``s_m``:
    ``rho_m = s_m / mean_{k != m} s_k``, ``q_m = clip(q_base (1 + lam tanh(relu(rho_m -
    1))), 0, 1)`` for a leading modality, 0 otherwise."""
    ratios, probs = {}, {}
    for m, s in scores.items():
        others = [v for k, v in scores.items() if k != m]
        rho = s / max(sum(others) / len(others), 1e-12)
        lead = math.tanh(max(rho - 1.0, 0.0))
        ratios[m] = rho
        probs[m] = min(max(q_base * (1.0 + lam * lead), 0.0), 1.0) if lead > 0 else 0.0
    return ratios, probs


def sample_keep_masks(
    q: dict[str, float], rows: int, p_exe: float, generator: torch.Generator
) -> dict[str, torch.Tensor] | None:
    """The official ``execute_drop`` draws: None when this batch's drop is not executed
    (probability ``1 - p_exe``), else per modality a boolean ``(rows,)`` keep mask with
    ``P(keep) = 1 - q_m``, independent over rows and modalities (CPU tensors)."""
    if float(torch.rand(1, generator=generator)) < 1.0 - p_exe:
        return None
    u = torch.rand(rows, len(q), generator=generator)
    return {m: u[:, k] >= q[m] for k, m in enumerate(q)}


@register_strategy
class OPMStrategy(Strategy):
    """Joint training that drops the leading modality's features at random (OPM)."""

    name = "opm"
    config_class = OPMConfig
    default_fusion = "concat"
    fusions = ("concat", "sum")
    config: OPMConfig

    def __init__(self, config: OPMConfig) -> None:
        super().__init__(config)
        self.epoch = 0
        #: the drops' random stream (seeded in setup, saved in the state)
        self.generator = torch.Generator()
        self._restored = False

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        if not self._restored:
            self.generator.manual_seed(ctx.seed * 1_000_003 + 7_919)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def modulates(self, epoch: int) -> bool:
        """Whether ``epoch`` (1-based) drops features."""
        end = self.config.modulation_end
        return self.config.modulation_start <= epoch and (end is None or epoch <= end)

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        model = ctx.model
        z = model.encode(batch)
        rows = any_present(batch.present)
        if not self.modulates(self.epoch):
            loss = masked_cross_entropy(model.fuse(z, batch.present).logits, batch.labels, rows)
            ctx.optimizer_step(loss)
            return {"loss": float(loss.detach())}
        cfg = self.config
        with torch.no_grad():
            unimodal = model.unimodal_logits({m: v.detach() for m, v in z.items()})
            scores = {}
            for m in ctx.modalities:
                p = torch.softmax(unimodal[m], 1).gather(1, batch.labels[:, None]).squeeze(1)
                scores[m] = float((p * batch.present[m]).sum())
        ratios, q = drop_probabilities(scores, cfg.q_base, cfg.lam)
        keep = sample_keep_masks(q, len(batch), cfg.p_exe, self.generator)
        logs: dict[str, float] = {}
        if keep is not None:
            theta = sum(q.values()) / len(q)
            kept_any = torch.zeros_like(rows)
            dropped = {}
            for m in ctx.modalities:
                k = keep[m].to(z[m].device)
                z[m] = z[m] * k.unsqueeze(1).to(z[m].dtype) / (1.0 - theta)
                kept_any |= k & batch.present[m]
                dropped[m] = float((~k & batch.present[m]).sum()) / max(len(batch), 1)
            rows = rows & kept_any
            for m in ctx.modalities:
                logs[f"drop_{m}"] = dropped[m]
        else:
            for m in ctx.modalities:
                logs[f"drop_{m}"] = 0.0
        logits = model.fuse(z, batch.present).logits
        loss = masked_cross_entropy(logits, batch.labels, rows)
        if bool(rows.any()):  # the official loop skips a batch with no row left
            ctx.optimizer_step(loss)
        logs["loss"] = float(loss.detach())
        for m in ctx.modalities:
            logs[f"ratio_{m}"] = ratios[m]
            logs[f"q_{m}"] = q[m]
        return logs

    def state_dict(self) -> dict[str, Any]:
        state = self.generator.get_state().numpy().tobytes()
        return {"epoch": self.epoch, "generator": base64.b64encode(state).decode("ascii")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", self.epoch))
        if state.get("generator") is not None:
            raw = bytearray(base64.b64decode(state["generator"]))
            self.generator.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())
            self._restored = True
