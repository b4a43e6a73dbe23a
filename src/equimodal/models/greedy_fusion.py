"""``mmtm``: MMTM-style gated cross-modal blocks with one branch (and head) per modality,
the model of the greedy learner (Wu et al., ICML 2022; strategy ``greedy``).

Source: ``MMTM_mitigate`` in ``src/balanced_mmtm.py`` and ``MMTM_MVCNN`` in ``src/model.py``
of the official code (github.com/nyukat/greedy_multimodal_learning).

Each modality ``m`` is a *branch*: its features ``z_m`` (the squeeze ``s_m``; features here
are vectors, so the official spatial mean is the identity), a gate and its own linear head.
The gate of branch ``m`` is the block's cross-modal connection into ``m``:

``e = ReLU(W_s [s_1; ...; s_M] + b_s)``, ``g_m = sigmoid(W_m e + b_m)``,
``logits_m = head_m(z_m * g_m)``, and the prediction is the mean of the present branches'
logits (the official ``(x_0 + x_1) / 2``). ``W_s`` maps ``M d`` to ``int(2 M d / ratio)``
(official ``ratio`` 4).

Call-time options (``model.fuse(..., fusion_kwargs={...})``):

* ``isolate``: branches that receive nothing from the other modalities: in their gate the
  other modalities' squeezes are replaced by ``reference`` (official
  ``turnoff_cross_modal_flow``, which uses the mean squeeze of the training data).
* ``reference``: those replacement squeezes per modality (default: the running means
  ``squeeze_mean`` the block keeps while training).
* ``rebalance``: branches whose gate is replaced by its running average ``gate_mean``
  (official ``curation_mode`` with ``caring_modality``): the re-balancing step, in which the
  branch learns without the other modalities' contribution.
* ``track`` (default true): in training mode, update ``gate_mean`` and ``squeeze_mean``.

The running averages are the official cumulative means over the training forward passes
(``(mean_batch + avg * n) / (n + 1)``), one count per modality, over the rows where the
modality is present; they are buffers, so checkpoints keep them. The official block also
updates them in evaluation passes and tracks the second modality's gate with the first
one's values (``running_avg_weight_skeleton`` is updated with ``vis_out``); here each
modality tracks its own gate, in training passes only.

A modality not passed, or absent from a row, is replaced in every gate by its reference
squeeze, and its branch is left out of the mean. The per-branch logits of every call are in
``MMTMOutput.branch_logits``; a modality's own logits (``unimodal_logits``) are its branch
isolated from the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from equimodal.core.registries import FUSIONS
from equimodal.models.fusion import Fusion, FusionOutput


@dataclass
class MMTMOutput(FusionOutput):
    """A fusion output with each branch's own logits ``(B, C)``."""

    branch_logits: dict[str, torch.Tensor] = field(default_factory=dict)


def _names(value: str | Iterable[str] | None) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, str):
        return {value}
    return set(value)


@FUSIONS.register()
class MMTMFusion(Fusion):
    """MMTM-style gated cross-modal block, one linear head per modality; see the module doc."""

    name = "mmtm"
    description = "MMTM-style gates between the modalities, one head per modality (greedy)"
    takes_options = True

    def __init__(
        self, modalities: Sequence[str], dim: int, num_classes: int, ratio: float = 4.0
    ) -> None:
        super().__init__(modalities, dim, num_classes)
        if ratio <= 0:
            raise ValueError(f"fusion 'mmtm': ratio must be positive, got {ratio}")
        total = dim * len(self.modalities)
        self.hidden = max(1, int(2 * total / ratio))
        self.squeeze = nn.Linear(total, self.hidden)
        self.excite = nn.ModuleDict({m: nn.Linear(self.hidden, dim) for m in self.modalities})
        self.heads = nn.ModuleDict({m: nn.Linear(dim, num_classes) for m in self.modalities})
        self._index = {m: k for k, m in enumerate(self.modalities)}
        size = len(self.modalities)
        self.register_buffer("gate_mean", torch.zeros(size, dim))
        self.register_buffer("squeeze_mean", torch.zeros(size, dim))
        self.register_buffer("tracked", torch.zeros(size))

    # ------------------------------------------------------------------ parts
    def cross_modal_parameters(self, modality: str) -> list[nn.Parameter]:
        """The connection into ``modality``'s branch: the shared squeeze layer and the
        branch's excitation (the official ``mmtm`` parameters of that modality)."""
        return [*self.squeeze.parameters(), *self.excite[modality].parameters()]

    def decision_weights(self) -> dict[str, torch.Tensor]:
        return {m: self.heads[m].weight for m in self.modalities}

    def head_modules(self, modality: str | None = None) -> list[nn.Module]:
        if modality is None:
            return [self.heads[m] for m in self.modalities]
        return [self.heads[modality]]

    # ------------------------------------------------------------------ computing
    def forward(
        self,
        z: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor],
        orders=None,
        weights=None,
        align_loss: bool = False,
        isolate: str | Iterable[str] | None = None,
        reference: Mapping[str, torch.Tensor] | None = None,
        rebalance: str | Iterable[str] | None = None,
        track: bool = True,
    ) -> MMTMOutput:
        isolated, rebalanced = _names(isolate), _names(rebalance)
        unknown = sorted((isolated | rebalanced) - set(self.modalities))
        if unknown:
            raise KeyError(f"fusion 'mmtm': unknown modality {unknown[0]!r}")
        ref = next(iter(z.values()))
        rows = ref.shape[0]
        fills = {
            m: (reference[m] if reference is not None and m in reference else self.squeeze_mean[k])
            .to(device=ref.device, dtype=ref.dtype)
            .expand(rows, self.dim)
            for k, m in enumerate(self.modalities)
        }
        avail = {
            m: present[m] if m in z else torch.zeros(rows, dtype=torch.bool, device=ref.device)
            for m in self.modalities
        }
        squeezes = {
            m: torch.where(avail[m].unsqueeze(1), z[m], fills[m]) if m in z else fills[m]
            for m in self.modalities
        }
        used = [m for m in self.modalities if m in z]
        shared = None
        gates: dict[str, torch.Tensor] = {}
        for m in used:
            if m in isolated:
                parts = [squeezes[k] if k == m else fills[k] for k in self.modalities]
                excitation = torch.relu(self.squeeze(torch.cat(parts, dim=1)))
            else:
                if shared is None:
                    cat = torch.cat([squeezes[k] for k in self.modalities], dim=1)
                    shared = torch.relu(self.squeeze(cat))
                excitation = shared
            gates[m] = torch.sigmoid(self.excite[m](excitation))
        if self.training and track:
            self._track(z, gates, avail)
        for m in used:
            if m in rebalanced:  # the official re-balancing step: the running-average gate
                k = self._index[m]
                gates[m] = self.gate_mean[k].to(ref.dtype, copy=True).expand(rows, self.dim)
        branch = {m: self.heads[m](z[m] * gates[m]) for m in used}
        total = ref.new_zeros(rows, self.num_classes)
        count = ref.new_zeros(rows, 1)
        blocks = []
        for m in self.modalities:
            if m in branch:
                p = avail[m].unsqueeze(1).to(ref.dtype)
                total = total + branch[m] * p
                count = count + p
                blocks.append(z[m] * gates[m] * p)
            else:
                blocks.append(ref.new_zeros(rows, self.dim))
        logits = total / count.clamp(min=1.0)
        return MMTMOutput(
            logits=logits, fused=torch.cat(blocks, dim=1), aux_losses=[], branch_logits=branch
        )

    @torch.no_grad()
    def _track(
        self,
        z: Mapping[str, torch.Tensor],
        gates: Mapping[str, torch.Tensor],
        avail: Mapping[str, torch.Tensor],
    ) -> None:
        """Cumulative means of each gate and squeeze over the rows where it is present."""
        for m, gate in gates.items():
            rows = avail[m]
            if not bool(rows.any()):
                continue
            k = self._index[m]
            n = self.tracked[k]
            self.gate_mean[k] = (
                gate[rows].mean(0).to(self.gate_mean.dtype) + self.gate_mean[k] * n
            ) / (n + 1)
            self.squeeze_mean[k] = (
                z[m][rows].mean(0).to(self.squeeze_mean.dtype) + self.squeeze_mean[k] * n
            ) / (n + 1)
            self.tracked[k] = n + 1

    def unimodal_logits(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each branch isolated from the others (their squeezes: the running means)."""
        out = {}
        for m, zm in z.items():
            ones = torch.ones(zm.shape[0], dtype=torch.bool, device=zm.device)
            out[m] = self.forward({m: zm}, {m: ones}, track=False).branch_logits[m]
        return out


__all__ = ["MMTMFusion", "MMTMOutput"]
