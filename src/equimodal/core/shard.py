"""The shard of a global batch that this process trains on (torchrun), as models see it.

Under ``torchrun`` every rank trains its rows of one global batch. Whatever a model or a
strategy computes over "the batch" — a masked mean, a correlation statistic, an InfoNCE
loss over rows — must be the global batch's value, or multi-process training would not
reproduce one process. The training loop makes a :class:`ShardContext` current for each
step (:func:`sharded`); code that computes a batch statistic asks :func:`current_shard`
and, when it is not None, uses its collective helpers. On one process it is None and the
plain code runs. This module imports nothing of equimodal, so models may use it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

_SHARD: ShardContext | None = None


def current_shard() -> ShardContext | None:
    """The shard of the global batch being trained on now (None on a single process)."""
    return _SHARD


@contextlib.contextmanager
def sharded(shard: ShardContext | None) -> Iterator[None]:
    """Make ``shard`` the current shard for the duration of one training step."""
    global _SHARD
    previous, _SHARD = _SHARD, shard
    try:
        yield
    finally:
        _SHARD = previous


# ---------------------------------------------------------------------- collectives
def _all_reduce(tensor: torch.Tensor, device: torch.device, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a copy of ``tensor`` on the communication device; returns it on its own."""
    home = tensor.device
    buf = tensor.detach().to(device).clone()
    dist.all_reduce(buf, op=op)
    return buf.to(home)


def _all_gather(tensor: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in rank order, on its own device."""
    buf = tensor.detach().to(device).contiguous()
    parts = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, buf)
    return [p.to(tensor.device) for p in parts]


def _gather_rows(
    x: torch.Tensor, counts: Sequence[int], device: torch.device
) -> list[torch.Tensor]:
    """Every rank's rows of ``x`` (``counts[r]`` rows on rank ``r``), in rank order."""
    mine = counts[dist.get_rank()]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[:mine] = x[:mine].detach()
    return [p[:c] for p, c in zip(_all_gather(padded, device), counts, strict=True)]


@dataclass
class ShardContext:
    """This rank's part of one global batch: the helpers that make batch statistics global.

    ``weight`` is the rank's share of the global batch (``n_r / b``; 0 for a stand-in row
    on a rank that got no row), ``real`` whether its rows belong to the batch at all. Every
    method is a collective: all ranks call it in the same order.
    """

    weight: float
    real: bool
    device: torch.device
    rank: int = 0
    world: int = 1

    # -------------------------------------------------------------- statistics
    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over ranks (a stand-in row contributes nothing); no gradient."""
        local = x.detach() if self.real else torch.zeros_like(x.detach())
        return _all_reduce(local, self.device)

    def any(self, mask: torch.Tensor) -> bool:
        """Whether any row of the global batch has ``mask`` set."""
        flag = torch.tensor([1.0 if self.real and bool(mask.any()) else 0.0])
        return bool(_all_reduce(flag, self.device, dist.ReduceOp.MAX)[0] > 0)

    def count(self, mask: torch.Tensor) -> int:
        """How many rows of the global batch have ``mask`` set."""
        local = torch.tensor([float(mask.sum()) if self.real else 0.0], dtype=torch.float64)
        return int(_all_reduce(local, self.device)[0])

    def batch_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The global batch's mean of a quantity this rank computed as a mean over its rows."""
        return _all_reduce(value.detach() * self.weight, self.device)

    def row_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the rows of the global batch of ``x`` (``(n_r, ...)`` on each rank)."""
        n = x.shape[0] if self.real else 0
        flat = _rows(x.detach())
        sums = flat.sum(0) if n else flat.new_zeros(flat.shape[1])
        local = torch.cat([sums, flat.new_tensor([float(n)])])
        total = _all_reduce(local, self.device)
        return (total[:-1] / total[-1]).reshape(x.shape[1:])

    def census(
        self, rows: torch.Tensor, values: torch.Tensor, size: int
    ) -> tuple[list[int], list[int]]:
        """Each rank's number of selected ``rows``, and the sorted distinct integers in
        ``[0, size)`` of ``values[rows]`` over all ranks (one collective)."""
        local = torch.zeros(size + 1, dtype=torch.float64)
        if self.real:
            local[0] = float(rows.sum())
            local[1 + values[rows].cpu()] = 1.0
        parts = _all_gather(local, self.device)
        counts = [int(p[0]) for p in parts]
        seen = torch.stack(parts)[:, 1:].amax(0)
        return counts, [int(i) for i in torch.nonzero(seen).flatten().tolist()]

    # -------------------------------------------------------------- losses
    def _local_gradient(self, value: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """``value`` (the global loss) carrying the gradient of ``local`` divided by the
        weight: weighted and summed over ranks, the gradients add up to the global one."""
        if not local.requires_grad:
            return value
        if self.weight == 0.0:  # a stand-in row: keep the graph, contribute nothing
            return value + (local - local.detach()) * 0.0
        return value + (local - local.detach()) / self.weight

    def masked_cross_entropy(
        self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """Cross-entropy averaged over the selected rows of the global batch."""
        rows = rows if self.real else torch.zeros_like(rows)
        if bool(rows.any()):
            local_sum = F.cross_entropy(logits[rows], labels[rows], reduction="sum")
        else:
            local_sum = logits.sum() * 0.0
        total = _all_reduce(
            torch.stack([local_sum.detach().double(), rows.sum().double()]), self.device
        )
        n = float(total[1])
        if n == 0:
            return logits.sum() * 0.0
        value = (total[0] / n).to(logits.dtype)
        return self._local_gradient(value, local_sum / n)

    def rows_loss(
        self,
        fn: Callable[..., torch.Tensor],
        *tensors: torch.Tensor,
        counts: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """``fn`` over the rows of the global batch, for losses that couple rows (InfoNCE).

        The tensors (the same rows, feature dimensions of any width) are gathered from
        every rank in rank order, the other ranks' rows without gradient; ``fn`` must not
        depend on the order of the rows. ``counts`` (each rank's number of rows, e.g. from
        :meth:`census`) saves a collective. The value is the global loss; the gradient flows
        through this rank's rows only.
        """
        n = tensors[0].shape[0] if self.real else 0
        if counts is None:
            counts = [int(c) for c in _all_gather(torch.tensor([float(n)]), self.device)]
        widths = [_rows(x).shape[1] for x in tensors]
        flat = torch.cat([_rows(x) for x in tensors], 1)
        parts = _gather_rows(flat, counts, self.device)
        parts[self.rank] = flat[:n]
        rows = torch.cat(parts)
        full = [
            piece.reshape(rows.shape[0], *x.shape[1:])
            for piece, x in zip(rows.split(widths, 1), tensors, strict=True)
        ]
        loss = fn(*full)
        return self._local_gradient(loss.detach(), loss)

    def cross_correlation(
        self, zi: torch.Tensor, zj: torch.Tensor, eps: float = 1e-5
    ) -> torch.Tensor | None:
        """The memory's statistic (row-L1-normalised cross-correlation of the standardised
        features) over the global batch; None when it has fewer than 2 rows."""
        if not self.real:
            zi, zj = zi[:0], zj[:0]
        d = zi.shape[1]
        xi, xj = zi.double(), zj.double()  # one pass of sums, in float64
        stats = torch.cat(
            [
                xi.new_tensor([float(xi.shape[0])]),
                xi.sum(0),
                xj.sum(0),
                (xi * xi).sum(0),
                (xj * xj).sum(0),
                (xi.T @ xj).reshape(-1),
            ]
        )
        total = _all_reduce(stats, self.device)
        n = int(total[0])
        if n < 2:
            return None
        mean_i, mean_j = total[1 : 1 + d] / n, total[1 + d : 1 + 2 * d] / n
        var_i = (total[1 + 2 * d : 1 + 3 * d] / n - mean_i**2).clamp_min(0.0)
        var_j = (total[1 + 3 * d : 1 + 4 * d] / n - mean_j**2).clamp_min(0.0)
        cov = total[1 + 4 * d :].reshape(d, d) / n - mean_i[:, None] * mean_j[None, :]
        corr = cov / ((var_i.sqrt() + eps)[:, None] * (var_j.sqrt() + eps)[None, :])
        corr = corr / (corr.abs().sum(dim=1, keepdim=True) + eps)
        return corr.to(zi.dtype)

    # -------------------------------------------------------------- gradients
    def _flat_grads(self, params: Sequence[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        has = torch.tensor([1.0 if p.grad is not None else 0.0 for p in params])
        has = _all_reduce(has, self.device, dist.ReduceOp.MAX)
        chosen = [p for p, h in zip(params, has.tolist(), strict=True) if h > 0]
        for p in chosen:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return chosen

    def reduce_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace each gradient by the global batch's: weighted by share, summed over ranks."""
        params = [p for p in params if p.requires_grad]
        chosen = self._flat_grads(params)
        for group in _by_dtype(chosen):
            buf = torch.cat([p.grad.reshape(-1) for p in group]).to(self.device)
            if self.weight == 0.0:
                buf.zero_()
            else:
                buf.mul_(self.weight)
            dist.all_reduce(buf)
            _unflatten(group, buf)

    def broadcast_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Give every rank rank 0's gradients (after a strategy modified them)."""
        # after reduce_gradients every rank holds gradients for the same parameters
        chosen = [p for p in params if p.requires_grad and p.grad is not None]
        for group in _by_dtype(chosen):
            buf = torch.cat([p.grad.reshape(-1) for p in group]).to(self.device)
            dist.broadcast(buf, src=0)
            _unflatten(group, buf)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(rows, features)`` (also with no rows)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _by_dtype(params: Sequence[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    groups: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault(p.dtype, []).append(p)
    return list(groups.values())


def _unflatten(params: Sequence[torch.nn.Parameter], buf: torch.Tensor) -> None:
    start = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(buf[start : start + n].view_as(p.grad))
        start += n
