"""``valuation``: sample-level modality valuation and re-sampling (Wei, Feng, Wang, Hu,
*Enhancing Multimodal Cooperation via Sample-level Modality Valuation*, CVPR 2024).

Source: the official implementation
(github.com/GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation): ``execute_modulation``
and ``train_epoch`` in ``code/sample_level.py`` and ``code/modality_level.py``,
``AV_KS_Dataset_sample_level`` / ``AV_KS_Dataset_modality_level`` in
``code/datasets/dataloader.py``, ``AVClassifier.exec_drop`` in ``code/models/models.py``;
BalanceBenchmark ports it as ``balancemm/trainer/Sample_trainer.py`` with
``Calculate_Shapley_Sample`` (``balancemm/evaluation/modalitys.py``) and
``create_dataset_sample_level`` / ``create_dataset_modality_level``
(``balancemm/datasets/__init__.py``).

**Valuation.** For one sample, the value of a coalition ``S`` of modalities is
``v(S) = |S|`` when the model's prediction from ``S`` alone is the label, else 0
(``v(empty) = 0``; the official ``value_all = 2``, ``value_a = value_v = 1``). The
prediction from ``S`` is the model in evaluation mode with the other modalities left out
(the fusion's own handling: ``concat`` fills their block). Each modality's contribution is
its exact Shapley value ``phi_m``; they sum to ``v(all)``, so a modality that carries its
share has ``phi_m >= 1``. For two modalities,
``phi_a = (v(a) + v(a, v) - v(v)) / 2``, the official formula.

**Sample level** (``level: sample``). After ``warmup`` epochs of joint training, every
sample ``i`` gets, for every modality ``m``, ``k(phi_m)`` extra copies in which only ``m``
is kept (the others dropped: the copy trains ``m``'s encoder alone, through the fusion):
``k = 0`` for ``phi >= 1``, 1 for ``0.4 <= phi < 1``, 2 for ``-0.1 <= phi < 0.4``, 3
below (the official bins for the values 0.5, 0 and -0.5). The low-contributing modality of a
sample is thus trained more on that sample. The loss is the mean cross-entropy over the
original rows (all modalities) and the copies.

**Modality level** (``level: modality``). Each epoch from ``warmup`` on, a random
``part_ratio`` of the training rows is valued; the next epoch, with the mean contributions
``c_m`` over them and ``gap_m = 1 - c_m``, a fraction
``alpha * 2/3 * (max_m gap_m - min_m gap_m)`` of extra rows, drawn uniformly with
replacement, is added as copies that keep only the modality with the largest gap.

Differences from the official code, and why:

- **When samples are valued.** The official loop values the whole training set after
  each epoch, with the model of that moment, and rebuilds the data set for the next
  epoch. equimodal's loop owns the data, so a strategy sees each training batch only when
  it trains on it: sample level values each batch right before its step, with the
  current model (evaluation mode, no gradient), at most one epoch fresher than the
  official values. Modality level values a ``part_ratio`` share of each batch's rows
  (Bernoulli draws) during the epoch and uses their means in the next epoch, as the
  official code does with its subset ``Z``.
- **Where copies go.** The official copies are shuffled into an enlarged data set (more
  steps per epoch); equimodal adds them to the batch of their original, in the same step.
  Each copy is encoded anew (its own dropout draw), as a separate item would be.
- **Dropping a modality.** The official ``drop`` zeroes the dropped modality's features
  before the concatenation head; equimodal leaves it out of the fusion (for ``concat``
  its learned fill, zero at initialisation), the same rule as the valuation's coalitions,
  so any fusion works.
- **Bins at their edges.** The official bins are open intervals, so ``phi`` exactly 0.4 or
  -0.1 got no copy; those values never occur with two modalities. equimodal closes the
  gaps: ``k(phi)`` is the number of the thresholds ``1, 0.4, -0.1`` strictly above
  ``phi``.
- **Modality level** draws ``floor(d B)`` rows (plus one with probability the fractional
  part) per batch of ``B`` rows instead of ``int(d N)`` from the whole set of ``N``.
- Model, optimizer and schedule are equimodal's (official: ResNet-18s, Adam 5e-5).

Ours: **any number of modalities** (the official code has two): exact Shapley values
of ``v(S) = |S| [correct]`` over all ``2^M`` coalitions, copies per modality with the same
bins (as BalanceBenchmark does, which values with ``v(S) = [correct]``); at modality
level the target is the modality with the largest gap and ``d`` uses the spread
``max - min`` of the gaps (the official ``|gap_a - gap_v|`` for two). **Missing
modalities**: a coalition counts only the modalities present in the row
(``|S ∩ present|``), so an absent modality has contribution 0, and it gets no copies.
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
from equimodal.strategies.base import Strategy, TrainContext, any_present, register_strategy

#: ``k(phi)``: one copy for each of these thresholds above ``phi`` (official bins)
COPY_THRESHOLDS = (1.0, 0.4, -0.1)


class ValuationConfig(StrategyConfig):
    """Options of ``valuation`` (defaults: ``code/sample_level.py``, ``modality_level.py``)."""

    name: Literal["valuation"] = "valuation"
    level: Literal["sample", "modality"] = Field(
        "sample", description="re-sample per sample (sample_level.py) or per modality"
    )
    warmup: int = Field(
        5, ge=0, description="epochs of joint training before re-sampling (official --warmup)"
    )
    part_ratio: float = Field(
        0.2, gt=0.0, le=1.0, description="modality level: share of rows valued (official Z)"
    )
    alpha: float = Field(1.0, ge=0.0, description="modality level: re-sampling strength")


def shapley_matrix(num_players: int) -> torch.Tensor:
    """``(2^M, M)`` matrix ``W`` with ``phi = v @ W`` for a value table ``v`` indexed by
    bitmask: ``W[T, i] = w(|T| - 1)`` if ``i`` is in ``T``, else ``-w(|T|)``."""
    w = shapley_weights(num_players)
    size = 1 << num_players
    out = torch.zeros(size, num_players, dtype=torch.float64)
    for mask in range(size):
        k = bin(mask).count("1")
        for i in range(num_players):
            if mask >> i & 1:
                out[mask, i] = float(w[k - 1])
            elif k < num_players:
                out[mask, i] = -float(w[k])
    return out


def coalition_values(correct: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``v(S) = |S ∩ present| [correct]`` per row: ``correct (B, 2^M)`` bool by bitmask,
    ``present (B, M)`` bool; ``v(empty) = 0``."""
    size = correct.shape[1]
    num = present.shape[1]
    bits = torch.tensor(
        [[mask >> i & 1 for i in range(num)] for mask in range(size)],
        dtype=torch.float64,
        device=correct.device,
    )
    members = present.to(torch.float64) @ bits.T  # (B, 2^M): present members of S
    values = members * correct.to(torch.float64)
    values[:, 0] = 0.0
    return values


def sample_shapley(values: torch.Tensor) -> torch.Tensor:
    """Exact Shapley values ``(B, M)`` of each row's value table ``(B, 2^M)``."""
    num = values.shape[1].bit_length() - 1
    return values.to(torch.float64) @ shapley_matrix(num).to(values.device)


def copy_counts(phi: torch.Tensor, thresholds=COPY_THRESHOLDS) -> torch.Tensor:
    """``k(phi)``: how many of ``thresholds`` lie above each value (0 to 3)."""
    counts = torch.zeros_like(phi, dtype=torch.long)
    for t in thresholds:
        counts += (phi < t).long()
    return counts


def resample_fraction(contribution: dict[str, float], alpha: float) -> tuple[float, str]:
    """Modality level: ``alpha * 2/3 * (max gap - min gap)`` with ``gap_m = 1 - c_m``, and
    the modality with the largest gap (first on ties)."""
    gaps = {m: 1.0 - c for m, c in contribution.items()}
    target = max(gaps, key=lambda m: gaps[m])
    return alpha * 2.0 / 3.0 * (gaps[target] - min(gaps.values())), target


@register_strategy
class ValuationStrategy(Strategy):
    """Shapley valuation per sample, extra unimodal copies for low contributors."""

    name = "valuation"
    config_class = ValuationConfig
    default_fusion = "concat"
    config: ValuationConfig

    def __init__(self, config: ValuationConfig) -> None:
        super().__init__(config)
        self.epoch = 0
        #: modality level: sums and counts of the contributions valued this epoch
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        #: modality level: the plan of this epoch (fraction of extra rows, the target)
        self.fraction = 0.0
        self.target: str | None = None
        self.contribution: dict[str, float] = {}
        self.generator = torch.Generator()

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self.weights = shapley_matrix(len(ctx.modalities))

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(self.context.seed * 1_000_003 + epoch)
        if self.config.level == "modality" and self.counts:
            self.contribution = {m: self.sums[m] / n for m, n in self.counts.items() if n > 0}
            if len(self.contribution) == len(self.context.modalities):
                self.fraction, self.target = resample_fraction(self.contribution, self.config.alpha)
            self.sums, self.counts = {}, {}

    @property
    def resampling(self) -> bool:
        """True in the epochs after the warm-up (1-based epochs ``> warmup``)."""
        return self.epoch > self.config.warmup

    # ------------------------------------------------------------------ valuation
    @torch.no_grad()
    def valuate(self, batch: MultimodalBatch) -> torch.Tensor:
        """Per-sample Shapley values ``(B, M)`` (float64) of ``v(S) = |S| [correct]``, the
        model in evaluation mode; the model's mode is restored afterwards."""
        model = self.context.model
        names = list(self.context.modalities)
        was_training = model.training
        model.eval()
        try:
            z = model.encode(batch)
            coalitions = [
                [m for i, m in enumerate(names) if mask >> i & 1]
                for mask in range(1, 1 << len(names))
            ]
            logits = model.fuse_coalitions(z, batch.present, coalitions)
        finally:
            model.train(was_training)
        correct = torch.zeros(len(batch), 1 << len(names), dtype=torch.bool)
        correct = correct.to(batch.labels.device)
        for mask, lg in enumerate(logits, start=1):
            correct[:, mask] = lg.argmax(1) == batch.labels
        present = torch.stack([batch.present[m] for m in names], dim=1)
        return coalition_values(correct, present) @ self.weights.to(correct.device)

    def plan(self, batch: MultimodalBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Copies ``(B, M)`` of each row per kept modality, and the Shapley values used
        (sample level; None at modality level)."""
        names = list(self.context.modalities)
        present = torch.stack([batch.present[m] for m in names], dim=1)
        if self.config.level == "sample":
            phi = self.valuate(batch)
            return copy_counts(phi) * present.long(), phi
        counts = torch.zeros(len(batch), len(names), dtype=torch.long)
        if self.target is None or self.fraction <= 0:
            return counts.to(present.device), None
        k = names.index(self.target)
        rows = present[:, k].nonzero().squeeze(1).cpu()
        if rows.numel() == 0:
            return counts.to(present.device), None
        expected = self.fraction * len(batch)
        n = int(math.floor(expected))
        if float(torch.rand((), generator=self.generator)) < expected - n:
            n += 1
        if n > 0:
            pick = torch.randint(rows.numel(), (n,), generator=self.generator)
            counts[:, k] = torch.bincount(rows[pick], minlength=len(batch))
        return counts.to(present.device), None

    def value_share(self, batch: MultimodalBatch) -> None:
        """Modality level: value a ``part_ratio`` share of the rows and add them up."""
        keep = torch.rand(len(batch), generator=self.generator) < self.config.part_ratio
        if not bool(keep.any()):
            return
        idx = keep.nonzero().squeeze(1).to(batch.labels.device)
        part = MultimodalBatch(
            inputs={m: x.index_select(0, idx) for m, x in batch.inputs.items()},
            present={m: p.index_select(0, idx) for m, p in batch.present.items()},
            labels=batch.labels.index_select(0, idx),
            indices=batch.indices.index_select(0, idx),
        )
        phi = self.valuate(part)
        for k, m in enumerate(self.context.modalities):
            rows = part.present[m]
            self.sums[m] = self.sums.get(m, 0.0) + float(phi[rows, k].sum())
            self.counts[m] = self.counts.get(m, 0) + int(rows.sum())

    # ------------------------------------------------------------------ training
    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        model = ctx.model
        names = list(ctx.modalities)
        counts, phi = self.plan(batch) if self.resampling else (None, None)
        if self.config.level == "modality" and self.epoch >= self.config.warmup:
            self.value_share(batch)
        out = model(batch)
        rows = any_present(batch.present, names)
        total = F.cross_entropy(out.logits[rows], batch.labels[rows], reduction="sum")
        seen = int(rows.sum())
        logs: dict[str, float] = {}
        if counts is not None:
            for k, m in enumerate(names):
                idx = torch.repeat_interleave(
                    torch.arange(len(batch), device=counts.device), counts[:, k]
                )
                logs[f"copies_{m}"] = float(idx.numel()) / len(batch)
                if idx.numel() == 0:
                    continue
                idx = idx.to(batch.labels.device)
                z = model.encode_modality(m, batch.inputs[m].index_select(0, idx))
                keep = torch.ones(idx.numel(), dtype=torch.bool, device=idx.device)
                logits = model.fuse({m: z}, {m: keep}, modalities=[m]).logits
                labels = batch.labels.index_select(0, idx)
                total = total + F.cross_entropy(logits, labels, reduction="sum")
                seen += idx.numel()
        loss = total / max(seen, 1)
        ctx.optimizer_step(loss)
        logs["loss"] = float(loss.detach())
        if phi is not None:
            for k, m in enumerate(names):
                logs[f"phi_{m}"] = float(phi[:, k].mean())
        return logs

    def epoch_log(self) -> dict[str, Any]:
        if self.config.level == "modality" and self.contribution:
            return {
                "contribution": dict(self.contribution),
                "resample_fraction": self.fraction,
                "resample_target": self.target,
            }
        return {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "sums": dict(self.sums),
            "counts": dict(self.counts),
            "fraction": self.fraction,
            "target": self.target,
            "contribution": dict(self.contribution),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.sums = {m: float(v) for m, v in state.get("sums", {}).items()}
        self.counts = {m: int(v) for m, v in state.get("counts", {}).items()}
        self.fraction = float(state.get("fraction", 0.0))
        self.target = state.get("target")
        self.contribution = {m: float(v) for m, v in state.get("contribution", {}).items()}
