"""The cross-modal memory of METHODS.md §1.2 ("refine and inherit").

The memory reads the modalities of a sample in an order and carries a state ``h`` of
width ``d`` from one modality to the next:

* step 1: ``h = z[pi_1]``;
* step k: the memory is mapped into the space of the modality now read
  (``h_aligned = h C_ij + A_ij(h)``; ``C_ij`` the row-L1-normalised cross-correlation of
  the standardised features of modality ``i`` (read before) and ``j`` (read now), ``A_ij``
  a learned map initialised to zero), then an LSTM-inspired cell:
  ``c = g_f * x + g_i * tanh(W_c h_aligned)``, ``h = g_o * tanh(c)`` with the gates
  computed from ``[x ; h_aligned]``;
* sample-level alignment: an InfoNCE loss between ``h_aligned`` and ``x`` over the batch.

A modality absent for a sample is skipped in that sample's chain (an identity step), so the
same code evaluates missing modalities, coalitions of modalities (Shapley values) and
several orders at once (orders stacked on the batch axis).

Our choices (METHODS marks them), each a constructor option:

* ``C`` is computed on each training batch without gradient and kept as an exponential
  moving average (identity before any training). ``train_stat="ema"`` (default) has
  training read the moving average, updated with the batch first; ``"batch"`` reads the
  batch statistic itself. On synthetic data the batch statistic jittered from batch to
  batch and joint training through the memory learned markedly slower (0.90 against 0.97
  validation accuracy after 8 epochs);
* ``align_stat`` / ``align_learned`` switch ``C`` and ``A`` off;
* initialisation: gate biases ``gate_bias`` (1.0: gates start mostly open) and an identity
  candidate map (``candidate_init="identity"``). With PyTorch's default initialisation
  each step attenuates what earlier modalities carried about tenfold.

Under torchrun (a shard of the global batch on each rank) the training statistic ``C``,
the InfoNCE loss and every "enough rows?" decision are those of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from equimodal.core.shard import ShardContext, current_shard


@dataclass
class MemoryResult:
    """Final memory state per sample (averaged over orders) and the alignment losses."""

    state: torch.Tensor
    #: one entry per step of the chain (None where no loss was computed)
    align_losses: list[torch.Tensor | None]


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of ``a`` and ``b`` (row i of each: a positive)."""
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    logits = a @ b.T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def batch_cross_correlation(zi: torch.Tensor, zj: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Row-L1-normalised ``d x d`` cross-correlation of the standardised ``zi`` and ``zj``."""
    zi = (zi - zi.mean(0)) / (zi.std(0, unbiased=False) + eps)
    zj = (zj - zj.mean(0)) / (zj.std(0, unbiased=False) + eps)
    corr = zi.T @ zj / zi.shape[0]
    return corr / (corr.abs().sum(dim=1, keepdim=True) + eps)


class CrossModalMemory(nn.Module):
    """The memory chain over ``num_modalities`` modalities of common width ``dim``."""

    def __init__(
        self,
        num_modalities: int,
        dim: int,
        align_stat: bool = True,
        align_learned: bool = True,
        stat_momentum: float = 0.9,
        align_temperature: float = 0.1,
        train_stat: str = "ema",
        gate_bias: float = 1.0,
        candidate_init: str = "identity",
    ) -> None:
        super().__init__()
        if train_stat not in ("batch", "ema"):
            raise ValueError(f"train_stat must be 'batch' or 'ema', got {train_stat!r}")
        if candidate_init not in ("identity", "default"):
            raise ValueError(
                f"candidate_init must be 'identity' or 'default', got {candidate_init!r}"
            )
        if num_modalities < 1 or dim < 1:
            raise ValueError(
                f"memory needs num_modalities >= 1 and dim >= 1, got {num_modalities}, {dim}"
            )
        if not 0.0 <= stat_momentum < 1.0:
            raise ValueError(f"stat_momentum must be in [0, 1), got {stat_momentum}")
        self.num_modalities = num_modalities
        self.dim = dim
        self.align_stat = align_stat
        self.align_learned = align_learned
        self.stat_momentum = stat_momentum
        self.align_temperature = align_temperature
        self.train_stat = train_stat
        self.gates = nn.Linear(2 * dim, 3 * dim)
        self.candidate = nn.Linear(dim, dim)
        # Initialisation (our choice): open gates and an identity candidate map let the
        # memory pass what earlier modalities carried from the first step on; with
        # PyTorch's default init each step attenuates it about tenfold.
        with torch.no_grad():
            self.gates.bias.fill_(gate_bias)
            if candidate_init == "identity":
                self.candidate.weight.copy_(torch.eye(dim))
                self.candidate.bias.zero_()
        m = num_modalities
        if align_learned:
            # A_ij(h) = h @ map_weight[i, j] + map_bias[i, j]; zero start = no learned shift.
            self.map_weight = nn.Parameter(torch.zeros(m, m, dim, dim))
            self.map_bias = nn.Parameter(torch.zeros(m, m, dim))
        eye = torch.eye(dim).expand(m, m, dim, dim).clone()
        self.register_buffer("corr_ema", eye)

    # ----------------------------------------------------------------- alignment
    def _shard(self) -> ShardContext | None:
        """The shard of a global batch being trained on (torchrun), else None."""
        return current_shard() if self.training else None

    def _pair_matrix(
        self, i: int, j: int, z: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The matrix and bias that map the memory from modality ``i`` into ``j``."""
        matrix = None
        if self.align_stat:
            both = present[:, i] & present[:, j]
            shard = self._shard()
            corr = None
            with torch.no_grad():
                if shard is not None:
                    corr = shard.cross_correlation(z[both, i].detach(), z[both, j].detach())
                elif self.training and int(both.sum()) >= 2:
                    corr = batch_cross_correlation(z[both, i].detach(), z[both, j].detach())
                if corr is not None:
                    ema = self.corr_ema[i, j]
                    ema.mul_(self.stat_momentum).add_(corr, alpha=1.0 - self.stat_momentum)
            if corr is not None:
                matrix = corr if self.train_stat == "batch" else self.corr_ema[i, j].clone()
            else:
                matrix = self.corr_ema[i, j]
        bias = None
        if self.align_learned:
            learned = self.map_weight[i, j]
            matrix = learned if matrix is None else matrix + learned
            bias = self.map_bias[i, j]
        return matrix, bias

    def _align(
        self,
        h: torch.Tensor,
        pair: torch.Tensor,
        active: torch.Tensor,
        z: torch.Tensor,
        present: torch.Tensor,
        pairs: list[int] | None = None,
    ) -> torch.Tensor:
        """``h_aligned`` for the rows in ``active``; ``pair = i * M + j`` per row.

        ``pairs``: the pairs to align (default: those of the active rows; under torchrun
        those of the global batch, so that every rank computes the same statistics).
        """
        if not (self.align_stat or self.align_learned):
            return h
        m = self.num_modalities
        if pairs is None:
            pairs = torch.unique(pair[active]).tolist()
        if len(pairs) == 1 and bool(active.all()):
            matrix, bias = self._pair_matrix(pairs[0] // m, pairs[0] % m, z, present)
            out = h @ matrix
            return out + bias if bias is not None else out
        out = torch.zeros_like(h)
        for p in pairs:
            rows = torch.nonzero(active & (pair == p)).squeeze(1)
            matrix, bias = self._pair_matrix(p // m, p % m, z, present)
            value = h.index_select(0, rows) @ matrix
            if bias is not None:
                value = value + bias
            out = out.index_put((rows,), value)
        return out

    def _align_blocks(
        self, h: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor, block: int
    ) -> torch.Tensor:
        """Evaluation fast path: one pair per order block, all blocks in one batched matmul."""
        if not (self.align_stat or self.align_learned):
            return h
        d = self.dim
        matrix = None
        if self.align_stat:
            matrix = self.corr_ema[prev, cur]
        if self.align_learned:
            learned = self.map_weight[prev, cur]
            matrix = learned if matrix is None else matrix + learned
        out = torch.bmm(h.view(-1, block, d), matrix)
        if self.align_learned:
            out = out + self.map_bias[prev, cur].unsqueeze(1)
        return out.reshape(-1, d)

    def cell(self, x: torch.Tensor, h_aligned: torch.Tensor) -> torch.Tensor:
        """The LSTM-inspired update from the modality read now and the aligned memory."""
        gates = torch.sigmoid(self.gates(torch.cat([x, h_aligned], dim=-1)))
        forget, inp, out = gates.chunk(3, dim=-1)
        c = forget * x + inp * torch.tanh(self.candidate(h_aligned))
        return out * torch.tanh(c)

    # ----------------------------------------------------------------- chain
    def forward(
        self,
        z: torch.Tensor,
        present: torch.Tensor,
        orders: torch.Tensor,
        weights: torch.Tensor | None = None,
        align_loss: bool = False,
    ) -> MemoryResult:
        """Run the chain.

        ``z``: ``(B, M, d)`` projected features in modality-index order; ``present``:
        ``(B, M)`` bool; ``orders``: ``(O, L)`` modality indices, ``L <= M`` (a modality
        left out of an order is not read); ``weights``: ``(O,)`` weights of the orders
        (uniform when None). Returns the weighted mean over orders of the final state,
        ``(B, d)``, and, when ``align_loss``, the InfoNCE loss of each step that updated
        at least two samples (one entry per step, None elsewhere).
        """
        b, m, d = z.shape
        if orders.dim() != 2 or orders.shape[1] == 0:
            raise ValueError(
                f"orders must have shape (O, L) with L >= 1, got {tuple(orders.shape)}"
            )
        num_orders, length = orders.shape
        rows = num_orders * b
        h = z.new_zeros(rows, d)
        prev = torch.full((rows,), -1, dtype=torch.long, device=z.device)
        losses: list[torch.Tensor | None] = []
        shard = self._shard()
        # With every modality present, each order block reads one pair per step: evaluation
        # then aligns all blocks at once instead of looping over pairs.
        blocked = (
            not self.training
            and num_orders > 1
            and bool(present.index_select(1, torch.unique(orders)).all())
        )
        for k in range(length):
            step_mod = orders[:, k]
            x = z.index_select(1, step_mod).transpose(0, 1).reshape(rows, d)
            here = present.index_select(1, step_mod).transpose(0, 1).reshape(rows)
            j = step_mod.repeat_interleave(b)
            update = here & (prev >= 0)
            step_loss = None
            pair = prev.clamp(min=0) * m + j
            if shard is not None:  # rows and pairs to update in the global batch
                counts, pairs = shard.census(update, pair, m * m)
                proceed = bool(pairs)
            else:
                counts, pairs = None, None
                proceed = bool(update.any())
            if proceed:
                if blocked:
                    h_aligned = self._align_blocks(h, orders[:, k - 1], step_mod, b)
                else:
                    h_aligned = self._align(h, pair, update, z, present, pairs)
                h_next = self.cell(x, h_aligned)
                h = torch.where(update.unsqueeze(1), h_next, h)
                if shard is not None:
                    if align_loss and sum(counts) >= 2:
                        step_loss = shard.rows_loss(
                            lambda a, c: info_nce(a, c, self.align_temperature),
                            h_aligned[update],
                            x[update],
                            counts=counts,
                        )
                elif align_loss and int(update.sum()) >= 2:
                    step_loss = info_nce(h_aligned[update], x[update], self.align_temperature)
            losses.append(step_loss)
            first = here & (prev < 0)
            h = torch.where(first.unsqueeze(1), x, h)
            prev = torch.where(here, j, prev)
        h = h.reshape(num_orders, b, d)
        if num_orders == 1:
            return MemoryResult(state=h[0], align_losses=losses)
        if weights is None:
            state = h.mean(0)
        else:
            w = weights.to(h.dtype) / weights.sum()
            state = torch.einsum("o,obd->bd", w, h)
        return MemoryResult(state=state, align_losses=losses)
