"""Multi-process training under ``torchrun``: one global batch, split across ranks.

``torchrun --nproc_per_node N -m equimodal train ...`` starts N processes with the usual
environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). :meth:`Distributed.setup` joins them in a process group (gloo on CPU,
nccl on CUDA); on one process it returns an inactive object whose every method is a no-op,
so the single-process path is the code it always was.

What is synchronised (see ``docs/distributed.md``):

* **data** — ``train.batch_size`` is the global batch. Every rank draws the same seeded
  permutation and cuts it into the same global batches as a one-process run; rank ``r``
  takes rows ``r, r + N, ...`` of each (DistributedSampler's interleaving). A rank left
  without a row (a last batch smaller than N) trains on a stand-in row with weight 0;
* **gradients** — after each backward pass every rank's gradients are multiplied by its
  share of the global batch (``n_r / b``) and summed over ranks, which is the gradient of
  the global batch's mean loss. A strategy's gradient modification then runs on the
  summed gradients and rank 0's result is broadcast (so random noise stays identical);
* **batch statistics** — losses and statistics defined over the batch go through the
  current :class:`ShardContext`: masked means, sums, "is any row present" decisions, the
  cross-modal memory's correlation statistic and its InfoNCE loss (rows gathered from
  every rank) are those of the global batch;
* **logs** — per-batch logs are weighted by the same shares and summed over ranks;
* **evaluation and files** — rank 0 scores validation (Shapley values included), decides
  best epoch and early stopping, writes every file, and broadcasts its strategy state
  (e.g. the next modality order) and decisions to the other ranks.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

if TYPE_CHECKING:
    from equimodal.data.batch import MultimodalBatch

_LOCAL_ONLY = 0
_SHARD: ShardContext | None = None


# ---------------------------------------------------------------------- environment
def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def is_initialized() -> bool:
    """True when a torch.distributed process group of more than one rank is up (and used)."""
    return (
        _LOCAL_ONLY == 0
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    )


def world_size() -> int:
    """Number of ranks: the process group's, else ``WORLD_SIZE`` (1 without torchrun)."""
    if _LOCAL_ONLY:
        return 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's rank: the process group's, else ``RANK`` (0 without torchrun)."""
    if _LOCAL_ONLY:
        return 0
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``; 0 without torchrun)."""
    return 0 if _LOCAL_ONLY else _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """True on rank 0 and on a single process: the one that prints and writes files."""
    return rank() == 0


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Within this block the process acts alone: nested runs do not join the group."""
    global _LOCAL_ONLY
    _LOCAL_ONLY += 1
    try:
        yield
    finally:
        _LOCAL_ONLY -= 1


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


# ---------------------------------------------------------------------- the run's group
class Distributed:
    """The process group of one training run, or an inactive stand-in on one process.

    Create it with :meth:`setup`. When inactive, :meth:`train_batches` is the split's own
    ``batches()`` and every synchronisation method returns its input unchanged.
    """

    def __init__(
        self,
        active: bool = False,
        rank: int = 0,
        world: int = 1,
        device: torch.device | None = None,
        owned: bool = False,
    ) -> None:
        self.active = active
        self.rank = rank
        self.world = world
        self.device = device or torch.device("cpu")  # where collectives run
        self.owned = owned

    @property
    def is_main(self) -> bool:
        """True on rank 0 (and on a single process)."""
        return self.rank == 0

    @classmethod
    def setup(cls, device: torch.device) -> tuple[Distributed, torch.device]:
        """Join the torchrun process group when launched with more than one rank.

        Returns the group and the device this rank trains on (``cuda:LOCAL_RANK`` under
        nccl). A group the caller already initialised is used, not re-created.
        """
        if _LOCAL_ONLY or world_size() <= 1:
            return cls(), device
        if device.type == "mps":
            raise ValueError("multi-process training runs on CPU (gloo) or CUDA (nccl), not MPS")
        if device.type == "cuda":
            device = torch.device("cuda", local_rank())
            torch.cuda.set_device(device)
        owned = False
        if not dist.is_initialized():
            missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
            if missing:
                raise ValueError(
                    f"WORLD_SIZE={world_size()} but {' and '.join(missing)} is not set; "
                    "start multi-process training with torchrun (see docs/distributed.md)"
                )
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=60))
            owned = True
        comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        return cls(True, dist.get_rank(), dist.get_world_size(), comm, owned), device

    def close(self) -> None:
        """Leave the process group if :meth:`setup` created it."""
        if self.active and self.owned and dist.is_initialized():
            dist.destroy_process_group()
        self.active = False

    # -------------------------------------------------------------- checks and state
    def check_strategy(self, strategy: Any) -> None:
        """ValueError for a strategy that does not support multi-process training."""
        if self.active and not getattr(strategy, "supports_distributed", False):
            from equimodal.strategies import strategy_names

            names = [n for n in strategy_names() if _strategy_supports(n)]
            raise ValueError(
                f"strategy {strategy.name!r} does not support multi-process training "
                f"(torchrun); run it on one process, or use one of {', '.join(names)}"
            )

    def seed_rank(self, seed: int) -> None:
        """Give ranks other than 0 their own random stream (dropout masks differ per rank)."""
        if self.active and self.rank > 0:
            torch.manual_seed(seed + 1_000_003 * self.rank)

    def broadcast_model(self, model: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        if not self.active:
            return
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                buf = t.detach().to(self.device).clone()
                dist.broadcast(buf, src=0)
                t.copy_(buf.to(t.device))

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Average batch-norm running statistics over ranks; other buffers from rank 0."""
        if not self.active:
            return
        averaged: set[int] = set()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    for t in (module.running_mean, module.running_var):
                        if t is not None:
                            t.copy_(_all_reduce(t, self.device) / self.world)
                            averaged.add(id(t))
            for t in model.buffers():
                if id(t) not in averaged:
                    buf = t.detach().to(self.device).clone()
                    dist.broadcast(buf, src=0)
                    t.copy_(buf.to(t.device))

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def sum_logs(self, sums: dict[str, float]) -> dict[str, float]:
        """Per-key sums over ranks (keys in rank 0's order, then any others)."""
        if not self.active:
            return sums
        parts: list[dict[str, float] | None] = [None] * self.world
        dist.all_gather_object(parts, sums)
        out: dict[str, float] = {}
        for part in parts:
            for k, v in (part or {}).items():
                out[k] = out.get(k, 0.0) + v
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            dist.barrier()

    # -------------------------------------------------------------- data
    def step(self, shard: ShardContext | None):
        """Context of one training step on ``shard`` (nothing on a single process)."""
        return sharded(shard) if shard is not None else contextlib.nullcontext()

    def train_batches(
        self,
        split: Any,
        batch_size: int,
        generator: torch.Generator,
        missing_rate: float = 0.0,
        min_rows: int = 1,
    ) -> Iterator[tuple[MultimodalBatch, ShardContext | None]]:
        """One shuffled epoch of ``split``: ``(batch, shard)`` pairs, ``shard`` None alone.

        Under torchrun each global batch is the one-process batch; this rank gets its
        interleaved rows, or a stand-in row with weight 0 when it has none. Missing
        modalities (``missing_rate``) are drawn for the whole global batch from the same
        generator, as on one process, then sliced. ``min_rows`` 2 (a model with batch
        norm, which cannot train on one row) skips a last batch too small to give every
        rank two rows, with a warning.
        """
        from equimodal.robustness import drop_modalities

        if not self.active:
            for batch in split.batches(batch_size, shuffle=True, generator=generator):
                if missing_rate > 0:
                    batch.present = drop_modalities(batch.present, missing_rate, generator)
                yield batch, None
            return
        if not hasattr(split, "batches_of"):
            raise ValueError(
                f"{type(split).__name__} has no batches_of(); multi-process training needs it"
            )
        if batch_size < min_rows * self.world:
            raise ValueError(
                f"train.batch_size {batch_size} gives some of the {self.world} processes fewer "
                f"than {min_rows} rows per batch; the model has batch norm, which needs at "
                f"least {min_rows} (use a batch size of at least {min_rows * self.world})"
            )
        yield from self._sharded_batches(split, batch_size, generator, missing_rate, min_rows)

    def _sharded_batches(self, split, batch_size, generator, missing_rate, min_rows=1):
        from equimodal.data.base import batch_order
        from equimodal.robustness import drop_modalities

        order = batch_order(len(split), batch_size, True, generator, drop_last=False)
        chunks = list(torch.split(order, batch_size))
        if min_rows > 1 and chunks and len(chunks[-1]) < min_rows * self.world:
            if self.is_main and not getattr(self, "_warned_short", False):
                import warnings

                warnings.warn(
                    f"multi-process training skips the last batch of each epoch "
                    f"({len(chunks[-1])} rows): the model has batch norm and {self.world} "
                    f"processes need at least {min_rows * self.world} rows",
                    stacklevel=2,
                )
                self._warned_short = True
            chunks = chunks[:-1]
        plan = []
        for chunk in chunks:
            positions = torch.arange(len(chunk))[self.rank :: self.world]
            real = len(positions) > 0
            plan.append((chunk, positions if real else torch.zeros(1, dtype=torch.long), real))
        local_rows = [chunk[positions] for chunk, positions, _ in plan]
        for (chunk, positions, real), batch in zip(plan, split.batches_of(local_rows), strict=True):
            if missing_rate > 0:
                full = {m: p[chunk] for m, p in split.present.items()}
                dropped = drop_modalities(full, missing_rate, generator)
                batch.present = {
                    m: p[positions.to(p.device)].to(batch.labels.device) for m, p in dropped.items()
                }
            weight = len(positions) / len(chunk) if real else 0.0
            yield batch, ShardContext(weight, real, self.device, self.rank, self.world)


def _strategy_supports(name: str) -> bool:
    from equimodal.strategies import get_strategy_class

    return bool(getattr(get_strategy_class(name), "supports_distributed", False))
