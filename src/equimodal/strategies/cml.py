"""``cml``: calibrating multimodal learning (Ma, Zhang, Zhang, Wu, Fu, Zhou, Hu, *Calibrating
Multimodal Learning*, ICML 2023), as BalanceBenchmark trains it.

Sources: BalanceBenchmark (github.com/GeWu-Lab/BalanceBenchmark), ``CMLTrainer`` in
``balancemm/trainer/CML_trainer.py`` (defaults in ``configs/trainer_config.yaml``), and the
authors' code (github.com/QingyangZhang/CML), ``rank_loss`` in ``cpm/CPM_Nets.py`` and the
stage-2 loop of ``miwae/train.py``.

The principle: a sample's confidence (its largest softmax probability) must not increase
when a modality is removed. Each epoch draws a random order of the modalities; every
batch of that epoch removes them one after the other, which gives the nested subsets
``S_0 = all``, ``S_k = S_{k-1} - {r_k}`` for ``k = 1 .. M-1`` (down to one modality), with
logits ``f(S_k)`` and confidences ``c_k = max softmax f(S_k)``. The loss is

``(1/M) sum_{k=0}^{M-1} CE(f(S_k), y) + lam * sum_{k=1}^{M-1} P_k``,
``P_k = sum_i ReLU(c_k,i - c_{k-1},i)``

(both confidences keep their gradients, as in both official codes). Outside epochs
``modulation_start..modulation_end`` the loss is ``CE(f(all), y)``.

Defaults (BalanceBenchmark): ``lam = 0.1``, epochs 1..81 (its ``modulation_starts 0``,
``modulation_ends 80`` on 0-based epochs), fusion ``concat``.

Differences from the official code, and our choices:

- **Per-sample hinge** (``penalty: sample``, default): ``sum_i ReLU(c_k,i - c_{k-1},i)``,
  the paper's principle and the authors' ``rank_loss``. BalanceBenchmark's ``conf_loss``
  takes ``max(0, sum_i (c_k,i - c_{k-1},i))``, the hinge of the batch sum, so one sample's
  drop can cancel another's rise and, once the sum is positive, every sample gets a
  gradient; ``penalty: batch`` reproduces it. Rows are summed (``reduction: sum``) as in
  both codes, which is what ``lam = 0.1`` is tuned for; ``reduction: mean`` averages them.
- **The exemption** of the authors' ``cpm`` code ("trick 1": no penalty on a row whose
  prediction is wrong with ``S_{k-1}`` and right with ``S_k``) is the option
  ``exempt_corrected`` (off: BalanceBenchmark computes this mask but never uses it).
- **Removing a modality.** BalanceBenchmark subtracts the modality's block of the concat
  head from the logits (``out_s - W_m z_m``), i.e. its features read as zeros;
  ``remove_by: zeros`` does exactly that, for any fusion. The default ``remove_by: absent``
  fuses the remaining modalities (``model.fuse(..., modalities=S_k)``), the fusion's own
  handling of an absent modality: for ``concat`` its block is the missing embedding, zeros
  at initialisation and trained by the subset terms; ``sum`` leaves the modality out of the
  sum; ``late`` and ``shared`` average the remaining heads; ``memory`` skips it.
- **The order** is drawn from the run's seed and the epoch (not Python's global
  ``random``), so it needs no state and a resumed run draws the same; BalanceBenchmark
  removes the last element of its shuffled list first, equimodal the first of its
  permutation (the same distribution). ``shuffle: false`` removes the modalities in reverse
  dataset order, as BalanceBenchmark does with an unshuffled list.
- **Missing modalities**: the CE of ``S_k`` is over rows with a modality of ``S_k``; ``P_k``
  is over rows that have the removed modality and still one of ``S_k`` (elsewhere the two
  predictions are the same, or ``S_k`` holds nothing of the row).
- ``subset_ce: false`` keeps only ``CE(f(all), y)`` with the regulariser (the paper's
  ``L_CE + lam L_CML``); BalanceBenchmark adds the CE of every subset, averaged over ``M``.

Ours: any number of modalities (``M >= 2``): BalanceBenchmark writes the two- and
three-modality cases (its division by ``M``, ``bias / M``); the chain above is the same
rule for any ``M``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from equimodal.config import StrategyConfig
from equimodal.data.batch import MultimodalBatch
from equimodal.models.model import MultimodalModel
from equimodal.strategies.base import (
    Strategy,
    TrainContext,
    any_present,
    masked_cross_entropy,
    register_strategy,
)


class CMLConfig(StrategyConfig):
    """Options of ``cml`` (defaults: BalanceBenchmark's)."""

    name: Literal["cml"] = "cml"
    lam: float = Field(0.1, ge=0.0, description="weight of the confidence regulariser")
    penalty: Literal["sample", "batch"] = Field(
        "sample",
        description="sample: sum_i ReLU(c_less - c_more) (paper, authors' code); batch: "
        "ReLU(sum_i (c_less - c_more)) (BalanceBenchmark's conf_loss)",
    )
    reduction: Literal["sum", "mean"] = Field(
        "sum", description="sum (both official codes) or mean of the rows' terms"
    )
    exempt_corrected: bool = Field(
        False,
        description="no penalty where removing the modality turns a wrong prediction right "
        "(the authors' cpm trick 1; BalanceBenchmark computes it but does not use it)",
    )
    subset_ce: bool = Field(
        True,
        description="CE of every nested subset, averaged over M (BalanceBenchmark); "
        "false: CE of all modalities only",
    )
    remove_by: Literal["absent", "zeros"] = Field(
        "absent",
        description="absent: fuse the remaining modalities (the fusion's own handling); "
        "zeros: the removed modality's features set to 0 (BalanceBenchmark's concat)",
    )
    shuffle: bool = Field(
        True, description="a random removal order each epoch (false: reverse dataset order)"
    )
    modulation_start: int = Field(1, ge=1, description="first regularised epoch (1-based)")
    modulation_end: int = Field(
        81, ge=0, description="last regularised epoch (1-based, inclusive; official 0..80)"
    )


def removal_order(
    modalities: Sequence[str], seed: int, epoch: int, shuffle: bool = True
) -> tuple[str, ...]:
    """The order the modalities are removed in during ``epoch``: a permutation drawn from
    ``(seed, epoch)``, or reverse dataset order without ``shuffle``."""
    names = tuple(modalities)
    if not shuffle:
        return names[::-1]
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + 17)
    perm = torch.randperm(len(names), generator=generator).tolist()
    return tuple(names[i] for i in perm)


def nested_subsets(modalities: Sequence[str], order: Sequence[str]) -> list[tuple[str, ...]]:
    """``S_0 = all``, ``S_k = S_{k-1} - {order[k-1]}`` down to one modality (dataset order)."""
    subsets = [tuple(modalities)]
    for removed in order[: len(modalities) - 1]:
        subsets.append(tuple(m for m in subsets[-1] if m != removed))
    return subsets


def subset_logits(
    model: MultimodalModel,
    z: Mapping[str, torch.Tensor],
    present: Mapping[str, torch.Tensor],
    subset: Sequence[str],
    remove_by: str = "absent",
) -> torch.Tensor:
    """Logits of ``subset``: the fusion reading only ``subset`` (``absent``) or every
    modality with the others' features set to zero (``zeros``)."""
    if remove_by == "zeros":
        zs = {m: v if m in subset else torch.zeros_like(v) for m, v in z.items()}
        return model.fuse(zs, present).logits
    return model.fuse(z, present, modalities=list(subset)).logits


def confidence_penalty(
    conf_less: torch.Tensor,
    conf_more: torch.Tensor,
    rows: torch.Tensor,
    penalty: str = "sample",
    reduction: str = "sum",
    exempt: torch.Tensor | None = None,
) -> torch.Tensor:
    """The CML hinge between the confidences with a modality removed (``conf_less``) and
    with it (``conf_more``), over ``rows``: ``agg_i ReLU(d_i)`` (``sample``) or
    ``ReLU(agg_i d_i)`` (``batch``), ``d = conf_less - conf_more``, ``agg`` the sum or the
    mean; rows in ``exempt`` count as ``d = 0``."""
    diff = conf_less - conf_more
    if exempt is not None:
        diff = diff * (~exempt).to(diff.dtype)
    diff = diff[rows]
    if diff.numel() == 0:
        return conf_less.sum() * 0.0
    if penalty == "sample":
        diff = torch.relu(diff)
    total = diff.sum() if reduction == "sum" else diff.mean()
    return torch.relu(total) if penalty == "batch" else total


def cml_losses(
    model: MultimodalModel,
    z: Mapping[str, torch.Tensor],
    batch: MultimodalBatch,
    order: Sequence[str],
    config: CMLConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ce, regulariser)`` of one batch from its features ``z`` and a removal ``order``:
    the CE of the nested subsets (averaged over ``M``, or of all modalities only) and
    ``sum_k P_k`` (without ``lam``)."""
    names = list(z)
    subsets = nested_subsets(names, order)
    labels, present = batch.labels, batch.present
    logits = [subset_logits(model, z, present, s, config.remove_by) for s in subsets]
    ce_terms = [
        masked_cross_entropy(lg, labels, any_present(present, s))
        for lg, s in zip(logits, subsets, strict=True)
    ]
    ce = torch.stack(ce_terms).sum() / len(names) if config.subset_ce else ce_terms[0]
    probs = [torch.softmax(lg, dim=1) for lg in logits]
    confs, preds = zip(*(p.max(dim=1) for p in probs), strict=True)
    terms = []
    for k in range(1, len(subsets)):
        removed = next(m for m in subsets[k - 1] if m not in subsets[k])
        rows = present[removed] & any_present(present, subsets[k])
        exempt = None
        if config.exempt_corrected:
            exempt = (preds[k] == labels) & (preds[k - 1] != labels)
        terms.append(
            confidence_penalty(
                confs[k], confs[k - 1], rows, config.penalty, config.reduction, exempt
            )
        )
    regulariser = torch.stack(terms).sum() if terms else ce * 0.0
    return ce, regulariser


@register_strategy
class CMLStrategy(Strategy):
    """CE of nested modality subsets plus a hinge on confidence gains; see the module doc."""

    name = "cml"
    config_class = CMLConfig
    default_fusion = "concat"
    config: CMLConfig

    def __init__(self, config: CMLConfig) -> None:
        super().__init__(config)
        self.epoch = 1
        #: True once the loop started an epoch (the history's epoch-0 row has no order)
        self.started = False

    def setup(self, ctx: TrainContext) -> None:
        if len(ctx.modalities) < 2:
            raise ValueError(
                f"cml removes modalities, so it needs 2 or more; this dataset has "
                f"{len(ctx.modalities)}"
            )
        super().setup(ctx)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        self.started = True

    def order(self) -> tuple[str, ...]:
        """This epoch's removal order."""
        ctx = self.context
        return removal_order(ctx.modalities, ctx.seed, self.epoch, self.config.shuffle)

    def regularising(self) -> bool:
        """Whether this epoch is in ``modulation_start..modulation_end``."""
        return self.config.modulation_start <= self.epoch <= self.config.modulation_end

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        z = ctx.model.encode(batch, ctx.modalities)
        if not self.regularising():
            rows = any_present(batch.present, list(z))
            loss = masked_cross_entropy(ctx.model.fuse(z, batch.present).logits, batch.labels, rows)
            ctx.optimizer_step(loss)
            return {"loss": float(loss.detach())}
        ce, regulariser = cml_losses(ctx.model, z, batch, self.order(), self.config)
        loss = ce + self.config.lam * regulariser
        ctx.optimizer_step(loss)
        return {
            "loss": float(loss.detach()),
            "ce": float(ce.detach()),
            "cml": float(regulariser.detach()),
        }

    def epoch_log(self) -> dict[str, Any]:
        if self.ctx is None or not self.started or not self.regularising():
            return {}
        return {"removal_order": list(self.order()[: len(self.context.modalities) - 1])}
