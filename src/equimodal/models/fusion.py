"""Fusions: how the projected features ``z_m`` become class logits.

Every fusion owns its classifier head and takes ``z`` (a dict over the modalities used
by this call), ``present`` masks, and (for the memory) the orders to read them in. A
modality not passed, or absent for a sample, is handled in the fusion's documented way:

* ``concat``: zeros in its block of the concatenation, then a linear head;
* ``sum``: left out of the sum, then a linear head;
* ``late``: one linear head per modality, logits = mean of the present heads;
* ``shared``: one linear head for every modality, logits = (weighted) mean over the
  present modalities of ``head(z_m)``;
* ``memory``: skipped in the memory chain, one linear head on the state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from equimodal.core.registries import FUSIONS
from equimodal.models.memory import CrossModalMemory

#: the built-in fusions (``FUSIONS.names()`` lists plugins too)
FUSION_NAMES = ("concat", "sum", "late", "shared", "memory")


@dataclass
class FusionOutput:
    """Logits ``(B, C)``, the fused representation, and the fusion's auxiliary losses."""

    logits: torch.Tensor
    fused: torch.Tensor
    aux_losses: list[torch.Tensor | None]


def _mask(z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    return z * present.unsqueeze(1).to(z.dtype)


def _cosine_output(
    z: dict[str, torch.Tensor],
    present: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    scale: float,
) -> FusionOutput:
    """MMCosine's logits: the sum over each row's present modalities of
    ``scale * cos(z_m, W_m[c])``, ``W_m`` the head block that reads ``z_m`` (no bias)."""
    ref = next(iter(z.values()))
    logits = ref.new_zeros(ref.shape[0], next(iter(weights.values())).shape[0])
    for m, v in z.items():
        cos = F.normalize(v, dim=1) @ F.normalize(weights[m], dim=1).T
        logits = logits + scale * cos * present[m].unsqueeze(1).to(v.dtype)
    return FusionOutput(logits=logits, fused=logits, aux_losses=[])


class Fusion(nn.Module):
    """Base class: ``modalities`` fixes the index of each modality.

    A new fusion subclasses this, sets ``name``, implements :meth:`forward` and
    :meth:`unimodal_logits`, and is registered with ``@FUSIONS.register()``. Its classifier
    lives in :meth:`head_modules`; strategies reach it only through the model's public API.
    """

    #: the registry name (``model.fusion`` in configs)
    name: ClassVar[str] = ""
    #: one line for the CLI help
    description: ClassVar[str] = ""
    #: True when the result depends on the order the modalities are read in
    uses_order: ClassVar[bool] = False
    #: True when the constructor takes keyword options (from the config)
    takes_options: ClassVar[bool] = False

    def __init__(self, modalities: Sequence[str], dim: int, num_classes: int) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.dim = dim
        self.num_classes = num_classes

    def forward(
        self,
        z: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor],
        orders: Sequence[Sequence[str]] | None = None,
        weights: Sequence[float] | None = None,
        align_loss: bool = False,
    ) -> FusionOutput:
        raise NotImplementedError

    def unimodal_logits(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-modality logits, one tensor ``(B, C)`` per modality in ``z``."""
        raise NotImplementedError

    def decision_weights(self) -> dict[str, torch.Tensor]:
        """The ``(C, d)`` decision weight that maps each modality's ``z_m`` to its logits."""
        head = self.head  # type: ignore[attr-defined]
        return {m: head.weight for m in self.modalities}

    def cross_modal_parameters(self, modality: str) -> list[nn.Parameter]:
        """Parameters through which the other modalities reach ``modality``'s branch
        (none for fusions that mix the modalities only in the head)."""
        return []

    def head_modules(self, modality: str | None = None) -> list[nn.Module]:
        """The linear classifier(s): all of them, or the one that reads ``modality``."""
        return [self.head]  # type: ignore[attr-defined]


@FUSIONS.register()
class ConcatFusion(Fusion):
    """Concatenate ``z_m`` in dataset order and apply one linear head.

    An absent modality (masked out, or left out of the coalition) fills its block with a
    learned *missing embedding*, initialised to zeros: it only moves when training sees
    absent modalities (``train.missing_rate`` or incomplete data), so on complete data the
    model is exactly zero-filled concatenation.
    """

    name = "concat"
    description = "concatenate the features (learned fill for absent ones), one linear head"

    def __init__(self, modalities: Sequence[str], dim: int, num_classes: int) -> None:
        super().__init__(modalities, dim, num_classes)
        self.head = nn.Linear(dim * len(self.modalities), num_classes)
        self.missing = nn.Parameter(torch.zeros(len(self.modalities), dim))

    def forward(
        self, z, present, orders=None, weights=None, align_loss=False, cosine_scale=None
    ) -> FusionOutput:
        """``cosine_scale`` (a call option): MMCosine's summed cosine logits instead."""
        if cosine_scale is not None:
            return _cosine_output(z, present, self.decision_weights(), cosine_scale)
        ref = next(iter(z.values()))
        blocks = []
        for k, m in enumerate(self.modalities):
            fill = self.missing[k].to(ref.dtype).expand(ref.shape[0], self.dim)
            if m in z:
                blocks.append(torch.where(present[m].unsqueeze(1), z[m], fill))
            else:
                blocks.append(fill)
        fused = torch.cat(blocks, dim=1)
        return FusionOutput(logits=self.head(fused), fused=fused, aux_losses=[])

    def decision_weights(self):
        w = self.head.weight
        return {m: w[:, k * self.dim : (k + 1) * self.dim] for k, m in enumerate(self.modalities)}

    def unimodal_logits(self, z):
        """``W_m z_m + b / M``: the modality's block of the head (they sum to the logits)."""
        out = {}
        share = self.head.bias / len(self.modalities)
        for k, m in enumerate(self.modalities):
            if m in z:
                w = self.head.weight[:, k * self.dim : (k + 1) * self.dim]
                out[m] = z[m] @ w.T + share
        return out


@FUSIONS.register()
class SumFusion(Fusion):
    """Sum the present ``z_m`` and apply one linear head."""

    name = "sum"
    description = "sum the present features, one linear head"

    def __init__(self, modalities: Sequence[str], dim: int, num_classes: int) -> None:
        super().__init__(modalities, dim, num_classes)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, z, present, orders=None, weights=None, align_loss=False) -> FusionOutput:
        fused = sum(_mask(z[m], present[m]) for m in self.modalities if m in z)
        return FusionOutput(logits=self.head(fused), fused=fused, aux_losses=[])

    def unimodal_logits(self, z):
        """``W z_m + b / M`` (they sum to the logits when all are present)."""
        share = self.head.bias / len(self.modalities)
        return {m: z[m] @ self.head.weight.T + share for m in self.modalities if m in z}


@FUSIONS.register()
class LateFusion(Fusion):
    """One linear head per modality; the logits are the mean of the present heads."""

    name = "late"
    description = "one linear head per modality, the mean of the present heads' logits"

    def __init__(self, modalities: Sequence[str], dim: int, num_classes: int) -> None:
        super().__init__(modalities, dim, num_classes)
        self.heads = nn.ModuleDict({m: nn.Linear(dim, num_classes) for m in self.modalities})

    def forward(
        self, z, present, orders=None, weights=None, align_loss=False, cosine_scale=None
    ) -> FusionOutput:
        """``cosine_scale`` (a call option): MMCosine's summed cosine logits instead."""
        if cosine_scale is not None:
            return _cosine_output(z, present, self.decision_weights(), cosine_scale)
        used = [m for m in self.modalities if m in z]
        ref = z[used[0]]
        total = ref.new_zeros(ref.shape[0], self.num_classes)
        count = ref.new_zeros(ref.shape[0], 1)
        for m in used:
            p = present[m].unsqueeze(1).to(ref.dtype)
            total = total + self.heads[m](z[m]) * p
            count = count + p
        logits = total / count.clamp(min=1.0)
        return FusionOutput(logits=logits, fused=logits, aux_losses=[])

    def unimodal_logits(self, z):
        return {m: self.heads[m](z[m]) for m in self.modalities if m in z}

    def decision_weights(self):
        return {m: self.heads[m].weight for m in self.modalities}

    def head_modules(self, modality: str | None = None) -> list[nn.Module]:
        if modality is None:
            return [self.heads[m] for m in self.modalities]
        return [self.heads[modality]]


@FUSIONS.register()
class SharedHeadFusion(Fusion):
    """One linear head shared by all modalities; logits combine the present modalities'.

    ``combine="mean"`` (default) averages the present modalities' logits; ``"entropy"``
    weights them per sample by ``softmax(-entropy_m)``, i.e. ``exp(max_k e_k - e_m)``
    normalised (MLA's test-time fusion, Zhang et al. CVPR 2024). ``combine`` is an option of
    the call (``model.fuse(..., fusion_kwargs={"combine": "entropy"})``), so a method sets
    how its model predicts without changing the model.
    """

    name = "shared"
    description = "one head shared by every modality, logits combined per sample"

    def __init__(self, modalities: Sequence[str], dim: int, num_classes: int) -> None:
        super().__init__(modalities, dim, num_classes)
        self.head = nn.Linear(dim, num_classes)

    def forward(
        self, z, present, orders=None, weights=None, align_loss=False, combine: str = "mean"
    ) -> FusionOutput:
        if combine not in ("mean", "entropy"):
            raise ValueError(f"fusion 'shared': combine is 'mean' or 'entropy', got {combine!r}")
        used = [m for m in self.modalities if m in z]
        logits = torch.stack([self.head(z[m]) for m in used], dim=1)  # (B, M, C)
        mask = torch.stack([present[m] for m in used], dim=1)  # (B, M)
        if combine == "entropy":
            logp = torch.log_softmax(logits, dim=-1)
            entropy = -(logp.exp() * logp).sum(-1)
            score = (-entropy).masked_fill(~mask, float("-inf"))
        else:
            score = torch.zeros_like(mask, dtype=logits.dtype).masked_fill(~mask, float("-inf"))
        weight = torch.softmax(score, dim=1).nan_to_num(0.0)  # rows with nothing present: 0
        fused = (weight.unsqueeze(-1) * logits).sum(1)
        return FusionOutput(logits=fused, fused=fused, aux_losses=[])

    def unimodal_logits(self, z):
        return {m: self.head(z[m]) for m in self.modalities if m in z}


@FUSIONS.register()
class MemoryFusion(Fusion):
    """The cross-modal memory chain with a linear head ``g`` on its state.

    In evaluation, several orders (hybrid-order inference) are one batched computation:
    orders stacked on the batch axis for small inputs, the prefix tree of
    :mod:`equimodal.models.order_tree` from ``tree_min_work`` rows x orders x width on.
    """

    name = "memory"
    takes_options = True
    description = "cross-modal memory chain read in an order, one linear head on its state"

    uses_order = True

    def __init__(
        self, modalities: Sequence[str], dim: int, num_classes: int, **memory_options: Any
    ) -> None:
        """``memory_options`` go to :class:`CrossModalMemory` (alignment, statistic, init)."""
        super().__init__(modalities, dim, num_classes)
        self.memory = CrossModalMemory(len(self.modalities), dim, **memory_options)
        self.head = nn.Linear(dim, num_classes)
        self._index = {m: k for k, m in enumerate(self.modalities)}
        #: evaluation with several orders goes through the prefix tree (each distinct
        #: prefix once, see ``order_tree``) from this much work (rows x orders x width)
        #: on; below it, stacking the orders on the batch axis has less overhead
        self.tree_min_work = 2048

    def order_tensor(self, orders: Sequence[Sequence[str]], device: torch.device) -> torch.Tensor:
        """Orders of modality names as an ``(O, L)`` index tensor (all of one length)."""
        lengths = {len(o) for o in orders}
        if len(lengths) != 1:
            raise ValueError(
                f"all orders of one call must have the same length, got {sorted(lengths)}"
            )
        try:
            idx = [[self._index[m] for m in order] for order in orders]
        except KeyError as err:
            raise KeyError(
                f"unknown modality {err.args[0]!r}; the model has {list(self.modalities)}"
            ) from None
        return torch.tensor(idx, dtype=torch.long, device=device)

    def forward(self, z, present, orders=None, weights=None, align_loss=False) -> FusionOutput:
        ref = next(iter(z.values()))
        used = [m for m in self.modalities if m in z]
        if orders is None:
            orders = [tuple(used)]
        stacked = torch.stack(
            [z[m] if m in z else ref.new_zeros(ref.shape[0], self.dim) for m in self.modalities],
            dim=1,
        )
        mask = torch.stack(
            [present[m] if m in z else torch.zeros_like(present[used[0]]) for m in self.modalities],
            dim=1,
        )
        order_idx = self.order_tensor(orders, ref.device)
        if (
            not self.training
            and not align_loss
            and len(orders) > 1
            and ref.shape[0] * len(orders) * self.dim >= self.tree_min_work
            and bool(mask.index_select(1, torch.unique(order_idx)).all())
        ):
            idx = order_idx.tolist()
            w_list = [1.0] * len(idx) if weights is None else [float(v) for v in weights]
            state = self.tree_states(stacked, [list(zip(idx, w_list, strict=True))])[0]
            return FusionOutput(
                logits=self.head(state), fused=state, aux_losses=[None] * len(idx[0])
            )
        w = (
            None
            if weights is None
            else torch.as_tensor(weights, dtype=ref.dtype, device=ref.device)
        )
        result = self.memory(stacked, mask, order_idx, weights=w, align_loss=align_loss)
        return FusionOutput(
            logits=self.head(result.state), fused=result.state, aux_losses=result.align_losses
        )

    def tree_states(
        self,
        stacked: torch.Tensor,
        targets: Sequence[Sequence[tuple[Sequence[int], float]]],
        logits: bool = False,
    ) -> torch.Tensor:
        """Evaluation of several targets (each a list of weighted orders of modality
        indices) over features ``(B, M, d)`` through one prefix tree: their averaged memory
        states ``(T, B, d)``, or with ``logits`` the head's output ``(T, B, C)``. Every
        modality the orders read must be present in every row."""
        from equimodal.models.order_tree import build_order_tree, tree_states

        tree = build_order_tree(targets)
        return tree_states(self.memory, stacked, tree, readout=self.head if logits else None)

    def unimodal_logits(self, z):
        """``g(z_m)``: the memory chain of one modality is its feature itself."""
        return {m: self.head(z[m]) for m in self.modalities if m in z}


def build_fusion(
    name: str, modalities: Sequence[str], dim: int, num_classes: int, **options: object
) -> Fusion:
    """Build the registered fusion ``name``; ``options`` go to its constructor."""
    cls = FUSIONS.get(name)
    if options and not cls.takes_options:
        raise ValueError(f"fusion {name!r} takes no options, got {sorted(options)}")
    return cls(modalities, dim, num_classes, **options)
