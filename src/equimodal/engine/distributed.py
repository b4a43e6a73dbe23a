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
import os
import sys
import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from equimodal.core.registries import STRATEGIES
from equimodal.core.shard import ShardContext, _all_reduce, current_shard, sharded
from equimodal.data.base import batch_order, count_batches
from equimodal.data.missing import drop_modalities

if TYPE_CHECKING:
    from equimodal.data.batch import MultimodalBatch

_LOCAL_ONLY = 0


# ---------------------------------------------------------------------- environment
def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _import_compiler_config() -> None:
    """Import ``torch._inductor.config`` before a process group exists.

    ``torch.use_deterministic_algorithms`` (called by ``seed_everything``) imports it, and
    with it torch's compiler stack. Imported for the first time while a gloo group exists,
    that stack keeps references to the group which outlive ``destroy_process_group``
    (torch 2.13 and 2.14), so the group's worker threads are never joined: a rank can then abort
    at interpreter exit ("terminate called without an active exception") when a worker
    still releases the last collective's tensors. Imported first, nothing holds the group.
    """
    import torch._inductor.config  # noqa: F401


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
            _import_compiler_config()
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=60))
            owned = True
        comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        return cls(True, dist.get_rank(), dist.get_world_size(), comm, owned), device

    def close(self) -> None:
        """Leave the process group if :meth:`setup` created it.

        After a normal end every rank waits for the others first (a rank that destroyed
        its gloo group while another still used it could abort at exit); while an
        exception is propagating it leaves at once (the other ranks may be gone).
        """
        if self.active and self.owned and dist.is_initialized():
            if sys.exc_info()[0] is None:
                dist.barrier()
            dist.destroy_process_group()
        self.active = False

    # -------------------------------------------------------------- checks and state
    def check_strategy(self, strategy: Any) -> None:
        """ValueError for a strategy that does not support multi-process training."""
        if self.active and not getattr(strategy, "supports_distributed", False):
            names = [n for n, cls in STRATEGIES.items() if getattr(cls, "supports_distributed", 0)]
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

    def batches_per_epoch(self, n: int, batch_size: int, min_rows: int = 1) -> int:
        """How many batches :meth:`train_batches` yields per epoch for ``n`` rows."""
        count = count_batches(n, batch_size)
        if (
            self.active
            and min_rows > 1
            and count
            and n - (count - 1) * batch_size < (min_rows * self.world)
        ):
            count -= 1  # the short last batch is skipped (batch norm on tiny shards)
        return count

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
        order = batch_order(len(split), batch_size, True, generator, drop_last=False)
        chunks = list(torch.split(order, batch_size))
        if min_rows > 1 and chunks and len(chunks[-1]) < min_rows * self.world:
            if self.is_main and not getattr(self, "_warned_short", False):
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


__all__ = ["Distributed", "ShardContext", "current_shard", "local_only", "is_main_process"]
