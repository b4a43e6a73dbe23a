"""The cross-modal memory of arXiv 2506.00030 ("refine and inherit").

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

Our choices (the paper leaves them open), each a constructor option:

* ``C`` is computed on each training batch without gradient and kept as an exponential
  moving average (momentum ``stat_momentum``, 0.9; identity before any training), which
  evaluation reads. Which statistic *training* reads is ``train_stat``: ``"ema"``
  (default) the moving average, updated with the batch first; ``"batch"`` the batch
  statistic itself. On synthetic data the batch statistic jittered from batch to batch and
  joint training through the memory learned markedly slower (0.90 against 0.97 validation
  accuracy after 8 epochs);
* ``align_stat`` / ``align_learned`` switch ``C`` and ``A`` off;
* initialisation: gate biases ``gate_bias`` (1.0: gates start mostly open) and an identity
  candidate map (``candidate_init="identity"``). With PyTorch's default initialisation
  each step attenuates what earlier modalities carried about tenfold.

Two guarantees the memory gives whatever calls it:

* **One moving-average update per pair per training batch.** A strategy may run the chain
  several times on one batch (``shapley_alternating`` runs it over every prefix
  ``pi_1..pi_k`` of the batch's order, reusing the detached features of the modalities
  already read; several orders in one call read a pair at several steps). Each run
  computes the pair's batch statistic from the same features, hence the same statistic;
  the memory keeps, per pair, the statistic it last folded into the moving average
  (``corr_last``) and folds a statistic only when it differs from that one. The moving
  average of pair ``(i, j)`` thus moves once per batch, with momentum ``stat_momentum``
  per batch as documented (``stat_updates`` counts the moves). What identifies "the
  batch" is its features: a strategy that re-encoded the same samples (a new dropout
  draw) and ran the chain again would present a new statistic and move it again.
* **No movement without gradient.** The learned map of each pair is its own parameter
  (``pair_weight[i * M + j]``, ``pair_bias[i * M + j]``), used only where the pair is
  read, so a training step whose chains never read a pair leaves that pair's gradient
  ``None``, and torch's optimizers (AdamW loop, ``foreach`` and ``fused`` alike, SGD) skip
  it: no momentum step, no weight decay. The prefix tree reads each pair's parameters
  (:meth:`CrossModalMemory.learned_map`); the stacked-orders path stacks the maps of its
  order blocks on the fly. The state dict keeps the packed layout (``map_weight``
  ``(M, M, d, d)``, ``map_bias`` ``(M, M, d)``, :meth:`CrossModalMemory.packed_maps`), so
  checkpoints written before and after per-pair parameters are one format.

Under torchrun (a shard of the global batch on each rank) the training statistic ``C``,
the InfoNCE loss and every "enough rows?" decision are those of the global batch; the
statistic is the same on every rank, so is the decision to fold it.
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
            # A_ij(h) = h @ pair_weight[i * m + j] + pair_bias[i * m + j]; zero start = no
            # learned shift. One parameter per pair: a step that reads no (i, j) leaves its
            # gradient None, and the optimizer skips it (see the module docstring).
            self.pair_weight = nn.ParameterList(
                [nn.Parameter(torch.zeros(dim, dim)) for _ in range(m * m)]
            )
            self.pair_bias = nn.ParameterList(
                [nn.Parameter(torch.zeros(dim)) for _ in range(m * m)]
            )
        eye = torch.eye(dim).expand(m, m, dim, dim).clone()
        self.register_buffer("corr_ema", eye)
        # the statistic each pair last folded into corr_ema (NaN: none yet; NaN equals
        # nothing) and how often each pair's moving average moved; neither is saved
        self.register_buffer(
            "corr_last", torch.full((m, m, dim, dim), float("nan")), persistent=False
        )
        self.register_buffer("stat_updates", torch.zeros(m, m, dtype=torch.long), persistent=False)
        self._register_state_dict_hook(_pack_pair_maps)

    # ----------------------------------------------------------------- learned maps
    def learned_map(self, i: int, j: int) -> tuple[nn.Parameter, nn.Parameter]:
        """The weight ``(d, d)`` and bias ``(d,)`` of ``A_ij`` (memory read ``i``, now ``j``)."""
        if not self.align_learned:
            raise ValueError("this memory has no learned map (align_learned=False)")
        p = i * self.num_modalities + j
        return self.pair_weight[p], self.pair_bias[p]

    def packed_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every ``A_ij`` stacked: weights ``(M, M, d, d)`` and biases ``(M, M, d)``.

        A new tensor (``torch.stack``, differentiable), not a view of the parameters:
        writing into it changes nothing; :meth:`load_packed_maps` writes.
        """
        if not self.align_learned:
            raise ValueError("this memory has no learned map (align_learned=False)")
        m, d = self.num_modalities, self.dim
        weight = torch.stack(list(self.pair_weight)).view(m, m, d, d)
        bias = torch.stack(list(self.pair_bias)).view(m, m, d)
        return weight, bias

    @torch.no_grad()
    def load_packed_maps(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Copy packed maps (:meth:`packed_maps`' layout) into the per-pair parameters."""
        m, d = self.num_modalities, self.dim
        if tuple(weight.shape) != (m, m, d, d) or tuple(bias.shape) != (m, m, d):
            raise ValueError(
                f"packed maps need shapes {(m, m, d, d)} and {(m, m, d)}, got "
                f"{tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        for p, (w, b) in enumerate(zip(self.pair_weight, self.pair_bias, strict=True)):
            w.copy_(weight.reshape(m * m, d, d)[p])
            b.copy_(bias.reshape(m * m, d)[p])

    def _load_from_state_dict(  # type: ignore[override]
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ) -> None:
        """Accept the packed layout of the learned maps (``map_weight``, ``map_bias``: what
        :meth:`state_dict` writes, and what every checkpoint before per-pair parameters
        holds) by splitting it into the per-pair keys before the parameters load."""
        m, d = self.num_modalities, self.dim
        if self.align_learned:
            for name, child, shape in (
                ("map_weight", "pair_weight", (m, m, d, d)),
                ("map_bias", "pair_bias", (m, m, d)),
            ):
                key = prefix + name
                if key not in state_dict:
                    continue
                packed = state_dict.pop(key)
                if tuple(packed.shape) != shape:
                    error_msgs.append(
                        f"size mismatch for {key}: copying a param with shape "
                        f"{tuple(packed.shape)}, the memory needs {shape}"
                    )
                    continue
                flat = packed.reshape(m * m, *shape[2:])
                for p in range(m * m):
                    state_dict[f"{prefix}{child}.{p}"] = flat[p]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ----------------------------------------------------------------- alignment
    def _shard(self) -> ShardContext | None:
        """The shard of a global batch being trained on (torchrun), else None."""
        return current_shard() if self.training else None

    @torch.no_grad()
    def _fold_statistic(self, i: int, j: int, corr: torch.Tensor) -> None:
        """Fold pair ``(i, j)``'s batch statistic into its moving average, once per batch.

        A statistic equal to the one this pair folded last comes from the same features
        (the chain run again on the same batch: another prefix, another order): it was
        folded already and is not folded again.
        """
        last = self.corr_last[i, j]
        if torch.equal(corr.to(last.dtype), last):  # compared in the buffer's dtype
            return
        ema = self.corr_ema[i, j]
        ema.mul_(self.stat_momentum).add_(corr, alpha=1.0 - self.stat_momentum)
        last.copy_(corr)
        self.stat_updates[i, j] += 1

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
                    self._fold_statistic(i, j, corr)
            if corr is not None:
                matrix = corr if self.train_stat == "batch" else self.corr_ema[i, j].clone()
            else:
                matrix = self.corr_ema[i, j]
        bias = None
        if self.align_learned:
            learned, bias = self.learned_map(i, j)
            matrix = learned if matrix is None else matrix + learned
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
        self,
        h: torch.Tensor,
        prev: torch.Tensor,
        cur: torch.Tensor,
        block: int,
        pairs: list[int],
        maps: tuple[list[torch.Tensor], list[torch.Tensor]] | None,
    ) -> torch.Tensor:
        """Evaluation fast path: one pair per order block, all blocks in one batched matmul.

        ``pairs``: each block's pair ``i * M + j`` (the same as ``prev``, ``cur``);
        ``maps``: the per-pair learned weights and biases, whose blocks' maps are stacked
        here (as many matrices as indexing a packed tensor would copy).
        """
        if not (self.align_stat or self.align_learned):
            return h
        d = self.dim
        matrix = None
        if self.align_stat:
            matrix = self.corr_ema[prev, cur]
        if maps is not None:
            learned = torch.stack([maps[0][p] for p in pairs])
            matrix = learned if matrix is None else matrix + learned
        out = torch.bmm(h.view(-1, block, d), matrix)
        if maps is not None:
            out = out + torch.stack([maps[1][p] for p in pairs]).unsqueeze(1)
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
        order_list: list[list[int]] = orders.tolist() if blocked else []
        maps = None
        if blocked and self.align_learned:
            # the ParameterLists' own storage, in pair order: iterating a ParameterList
            # looks each entry up by name (about 80 us at M = 8, per call)
            maps = (
                list(self.pair_weight._parameters.values()),
                list(self.pair_bias._parameters.values()),
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
                    step_pairs = [o[k - 1] * m + o[k] for o in order_list]
                    h_aligned = self._align_blocks(
                        h, orders[:, k - 1], step_mod, b, step_pairs, maps
                    )
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


def _pack_pair_maps(module: CrossModalMemory, state_dict, prefix: str, local_metadata) -> None:
    """State-dict hook: the per-pair learned maps as the packed ``map_weight`` and
    ``map_bias`` (the checkpoint layout before per-pair parameters, kept so that old and
    new checkpoints load alike; :meth:`CrossModalMemory._load_from_state_dict` splits it)."""
    if not module.align_learned:
        return
    m, d = module.num_modalities, module.dim
    for name, child, shape in (
        ("map_weight", "pair_weight", (m, m, d, d)),
        ("map_bias", "pair_bias", (m, m, d)),
    ):
        parts = [state_dict.pop(f"{prefix}{child}.{p}") for p in range(m * m)]
        state_dict[prefix + name] = torch.stack(parts).view(shape)
    # the old order too (parameters, then buffers, then submodules): this module's other
    # entries, the last ones written, go after the packed maps
    packed = (prefix + "map_weight", prefix + "map_bias")
    for key in [k for k in state_dict if k.startswith(prefix) and k not in packed]:
        state_dict[key] = state_dict.pop(key)
