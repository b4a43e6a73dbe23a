"""``mbsd``: the MBSD objective as BalanceBenchmark implements it.

Source: BalanceBenchmark (Xu, Cui, Huang, Wang, Hu, *BalanceBenchmark: A Survey for
Multimodal Imbalance Learning*, arXiv 2502.10816, 2025; code github.com/GeWu-Lab/
BalanceBenchmark), ``MBSDTrainer.training_step`` in ``balancemm/trainer/MBSD_trainer.py``
(defaults in ``configs/trainer_config.yaml``). The benchmark lists the method as
"MBSD [Liu et al., 2023]", an objective-level method for two modalities with a performance
score as its imbalance indicator; the cited paper's text was not available to us, so the
rule here is the benchmark's code, written out.

Each batch, with ``u_m`` the modality's own logits (its block of the head plus ``b / M``,
the official ``fc_out.bias / all_nums``), ``p_m = softmax(u_m)``, ``y`` the labels, and for
each pair of modalities ``(a, b)`` and each row ``i``:

- ``s_i = max(p_a[i, y_i], p_b[i, y_i])`` (the stronger modality's true-class probability),
  ``w'_i = min(...)`` (the weaker's);
- ``w_i = s_i - w'_i`` when modality ``a`` or ``b`` predicts ``y_i`` (argmax), else 0;
- ``KL_i = w'_i (log w'_i - s_i)``: the official ``F.kl_div(ps, pw, reduction='none')``,
  whose input ``ps`` is a probability where ``kl_div`` expects a log-probability;
- ``RS_i = (1/C) sum_c (r_a[i, c] - r_b[i, c])^2`` with ``r = u`` (logits) for two
  modalities and ``r = p`` (probabilities) for three, as the official two- and
  three-modality paths compute it;
- ``L_KL(a, b) = mean_i w_i KL_i``, ``L_RS(a, b) = mean_i w_i RS_i``.

``loss = CE(fused, y) + sum_m CE(u_m, y) + mean_pairs L_KL + mean_pairs L_RS``; gradients
flow through everything, ``w``, ``s`` and ``w'`` included (the official code builds ``w``,
``ps`` and ``pw`` by assigning tensors that carry gradients into fresh ones). Outside the
epochs ``modulation_start..modulation_end`` (1-based; official 0..80 on 0-based epochs)
the loss is ``CE(fused, y)`` alone.

Differences from the official code, and why:

- The trainer as released calls ``model.Unimodality_Calculate()``, a method no model of
  the benchmark defines (they have ``unimodality_calculate``), so it stops with an
  ``AttributeError`` before its first step; the unimodal logits it means are those of
  ``unimodality_calculate``, which ``forward`` has already computed, and are used here.
- ``torch.maximum`` / ``torch.minimum`` replace Python's ``max`` / ``min`` per row: equal
  values and gradients except at exact ties of two probabilities, where the official
  code sends the whole gradient to the first modality and these split it.
- Missing modalities (the official data has none): a modality's CE is over its present
  rows; a pair's terms are averaged over the rows where both are present (the official
  divides by the batch size, which is the same when every row has both).
- Model, optimizer and schedule are equimodal's (the run's config).

Ours: any number of modalities, averaging the pair terms over the ``M (M-1) / 2`` pairs
(the official three-modality path averages its three pairs; two modalities have one);
``similarity`` ``auto`` compares logits for two modalities and probabilities otherwise,
and ``logits`` / ``probabilities`` choose one for any ``M``.
"""

from __future__ import annotations

from itertools import combinations
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from equimodal.config import StrategyConfig
from equimodal.data.batch import MultimodalBatch
from equimodal.strategies.base import Strategy, any_present, masked_cross_entropy, register_strategy


class MBSDConfig(StrategyConfig):
    """Options of ``mbsd``."""

    name: Literal["mbsd"] = "mbsd"
    modulation_start: int = Field(1, ge=1, description="first epoch with the MBSD terms (1-based)")
    modulation_end: int = Field(
        81, ge=0, description="last epoch with the MBSD terms (1-based, inclusive; official 0..80)"
    )
    similarity: Literal["auto", "logits", "probabilities"] = Field(
        "auto",
        description="what RS compares: auto = logits for 2 modalities, probabilities for more "
        "(the official two- and three-modality paths)",
    )


def pair_terms(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    labels: torch.Tensor,
    on_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(w, KL, RS)`` of one pair of modalities (see the module doc)."""
    probs_a, probs_b = torch.softmax(logits_a, 1), torch.softmax(logits_b, 1)
    true_a = probs_a.gather(1, labels[:, None]).squeeze(1)
    true_b = probs_b.gather(1, labels[:, None]).squeeze(1)
    strong, weak = torch.maximum(true_a, true_b), torch.minimum(true_a, true_b)
    correct = (logits_a.argmax(1) == labels) | (logits_b.argmax(1) == labels)
    weight = (strong - weak) * correct.to(strong.dtype)
    kl = F.kl_div(strong, weak, reduction="none")  # official: ps taken as a log-probability
    diff = logits_a - logits_b if on_logits else probs_a - probs_b
    rs = diff.pow(2).sum(1) / logits_a.shape[1]
    return weight, kl, rs


@register_strategy
class MBSDStrategy(Strategy):
    """Fused and unimodal CE plus weighted pairwise KL and RS terms; see the module doc."""

    name = "mbsd"
    config_class = MBSDConfig
    default_fusion = "concat"
    fusions = ("concat", "late", "sum", "shared")
    config: MBSDConfig

    def __init__(self, config: MBSDConfig) -> None:
        super().__init__(config)
        self.epoch = 1  # the loop sets it each epoch; a strategy driven by hand is in epoch 1

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def on_logits(self) -> bool:
        """Whether RS compares logits (else probabilities)."""
        if self.config.similarity == "auto":
            return len(self.context.modalities) == 2
        return self.config.similarity == "logits"

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        cfg = self.config
        out = ctx.model(batch, with_unimodal=True)
        labels = batch.labels
        rows = any_present(batch.present)
        ce = masked_cross_entropy(out.logits, labels, rows)
        logs = {"ce": float(ce.detach())}
        if not cfg.modulation_start <= self.epoch <= cfg.modulation_end:
            ctx.optimizer_step(ce)
            logs["loss"] = logs["ce"]
            return logs
        unimodal = out.unimodal_logits
        assert unimodal is not None
        total = ce
        for m in ctx.modalities:
            if not bool(batch.present[m].any()):
                continue
            ce_m = masked_cross_entropy(unimodal[m], labels, batch.present[m])
            total = total + ce_m
            logs[f"ce_{m}"] = float(ce_m.detach())
        kls, rss, weights = [], [], []
        on_logits = self.on_logits()
        for a, b in combinations(ctx.modalities, 2):
            both = batch.present[a] & batch.present[b]
            if not bool(both.any()):
                continue
            w, kl, rs = pair_terms(unimodal[a][both], unimodal[b][both], labels[both], on_logits)
            kls.append((w * kl).mean())
            rss.append((w * rs).mean())
            weights.append(float(w.detach().mean()))
        if kls:
            kl_loss, rs_loss = torch.stack(kls).mean(), torch.stack(rss).mean()
            total = total + kl_loss + rs_loss
            logs["kl"] = float(kl_loss.detach())
            logs["rs"] = float(rs_loss.detach())
            logs["weight"] = sum(weights) / len(weights)
        ctx.optimizer_step(total)
        logs["loss"] = float(total.detach())
        return logs
