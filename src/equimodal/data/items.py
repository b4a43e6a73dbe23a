"""Splits read item by item from disk (audio, frames, text), batched by a DataLoader.

Media datasets do not fit in memory as tensors. An :class:`ItemSplit` keeps only the list
of items, their labels and present masks; ``read(item)`` returns one sample's tensors per
modality, and :meth:`ItemSplit.batches` runs a ``torch.utils.data.DataLoader`` (optionally
with worker processes) and yields the same :class:`MultimodalBatch` as an in-memory split,
so the trainer, the strategies and the evaluation do not know the difference.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from equimodal.data.base import batch_order, check_some_modality, count_batches
from equimodal.data.batch import MultimodalBatch

Reader = Callable[[Any], dict[str, torch.Tensor]]


class _ReadFailure:
    """A bad item met in a worker process, sent back as data so the error stays one line.

    A DataLoader re-raises a worker's exception with the worker's whole traceback in its
    message; the main process raises ``kind(message)`` instead, as without workers.
    """

    def __init__(self, err: BaseException) -> None:
        self.kind = type(err)
        self.message = str(err)

    def error(self) -> BaseException:
        try:
            return self.kind(self.message)
        except Exception:  # an exception class with another signature
            return ValueError(self.message)


class _ItemDataset(Dataset):
    def __init__(self, split: ItemSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(
        self, key: int | tuple[int, int]
    ) -> tuple[dict[str, torch.Tensor] | _ReadFailure, int]:
        if isinstance(key, tuple):  # (pass, row): a persistent worker's copy of the split
            self.split.passes, i = key  # learns which pass it reads (per-pass augmentation)
        else:
            i = key
        try:
            return self.split.read_item(i), i
        except (ValueError, OSError) as err:  # a missing or unreadable file of this item
            if get_worker_info() is None:
                raise
            return _ReadFailure(err), i


class _PassBatches:
    """The batch sampler of a split's one DataLoader: the row sets of the current pass,
    each row tagged with the pass number (set before every pass)."""

    def __init__(self) -> None:
        self.row_sets: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.row_sets)

    def __len__(self) -> int:
        return len(self.row_sets)


def default_workers() -> int:
    """Loader worker processes that suit this machine: ``EQUIMODAL_NUM_WORKERS`` when set,
    else one per two CPU cores, at most 4, none on a machine with fewer than 4 cores
    (where the workers compete with training for the cores)."""
    env = os.environ.get("EQUIMODAL_NUM_WORKERS")
    if env is not None:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"EQUIMODAL_NUM_WORKERS must be an integer, got {env!r}") from None
        if value < 0:
            raise ValueError(f"EQUIMODAL_NUM_WORKERS must be >= 0, got {value}")
        return value
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    return 0 if cores < 4 else min(4, cores // 2)


class ItemSplit:
    """One split of a dataset read from disk, one item at a time.

    ``items[i]`` is whatever ``read`` needs (e.g. a dict of file paths); ``read(item)``
    returns ``{modality: tensor}`` with a fixed shape per modality (``shapes``). Absent
    modalities (``present[m][i]`` False) are not read and become zeros.

    ``num_workers`` loader processes read the items (``"auto"``: :func:`default_workers`);
    they persist across passes (one DataLoader per split, ``persistent_workers``), each
    keeps ``prefetch_factor`` batches ready, and batches for a CUDA device are read into
    pinned memory so the copy overlaps compute. Every item is read with the number of
    its pass, so augmentation seeded by (seed, pass, row) is the same with or without
    workers.
    """

    def __init__(
        self,
        items: Sequence[Any],
        read: Reader,
        labels: torch.Tensor,
        shapes: dict[str, tuple[int, ...]],
        dtypes: dict[str, torch.dtype] | None = None,
        present: dict[str, torch.Tensor] | None = None,
        indices: torch.Tensor | None = None,
        num_workers: int | str = 0,
        device: torch.device | str = "cpu",
        prefetch_factor: int = 2,
    ) -> None:
        n = len(items)
        if int(labels.shape[0]) != n:
            raise ValueError(f"{n} items but {labels.shape[0]} labels")
        self.items = list(items)
        self.read = read
        self.labels = labels.long()
        self.shapes = {m: tuple(s) for m, s in shapes.items()}
        self.dtypes = {m: (dtypes or {}).get(m, torch.float32) for m in shapes}
        self.indices = indices.long() if indices is not None else torch.arange(n)
        if present is None:
            present = {m: torch.ones(n, dtype=torch.bool) for m in shapes}
        self.present = {m: present[m].bool() for m in shapes}
        check_some_modality(self.present, self.indices)
        if num_workers == "auto":
            num_workers = default_workers()
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be 'auto' or an integer >= 0, got {num_workers!r}")
        if prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {prefetch_factor}")
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.passes = 0  # passes over the split so far: seeds the loader's workers
        self.device = torch.device(device)
        self._loader: DataLoader | None = None
        self._batches = _PassBatches()

    def __len__(self) -> int:
        return len(self.items)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    def to(self, device: torch.device | str) -> ItemSplit:
        """The same split, its batches delivered on ``device``."""
        out = self.__class__.__new__(self.__class__)
        out.__dict__.update(self.__dict__)
        out.device = torch.device(device)
        out._loader, out._batches = None, _PassBatches()  # its own loader and workers
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_loader"] = None  # a worker's copy never owns the workers
        return state

    def read_item(self, i: int) -> dict[str, torch.Tensor]:
        """Sample ``i``'s tensors (zeros for absent modalities), shapes checked."""
        wanted = [m for m in self.shapes if bool(self.present[m][i])]
        got = self.read(self.items[i]) if wanted else {}
        out = {}
        for m, shape in self.shapes.items():
            if m in wanted:
                if m not in got:
                    raise ValueError(f"item {self.items[i]!r}: the reader returned no {m!r}")
                x = got[m]
                if tuple(x.shape) != shape:
                    raise ValueError(
                        f"item {self.items[i]!r}: modality {m!r} has shape {tuple(x.shape)}, "
                        f"expected {shape}"
                    )
                out[m] = x.to(self.dtypes[m])
            else:
                out[m] = torch.zeros(shape, dtype=self.dtypes[m])
        return out

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[MultimodalBatch]:
        """Iterate over mini-batches; ``shuffle`` draws the order from ``generator``."""
        order = batch_order(len(self), batch_size, shuffle, generator, drop_last)
        yield from self.batches_of(torch.split(order, batch_size))

    def batches_of(self, row_sets: Sequence[torch.Tensor]) -> Iterator[MultimodalBatch]:
        """One batch per tensor of row numbers in ``row_sets``, read through the split's
        DataLoader."""
        self.passes += 1
        self._batches.row_sets = [[(self.passes, int(i)) for i in r.tolist()] for r in row_sets]
        for inputs, rows in self._data_loader():
            if isinstance(inputs, _ReadFailure):
                raise inputs.error()
            rows = torch.as_tensor(rows)
            batch = MultimodalBatch(
                inputs=inputs,
                present={m: p[rows] for m, p in self.present.items()},
                labels=self.labels[rows],
                indices=self.indices[rows],
            )
            yield batch if self.device.type == "cpu" else batch.to(self.device)

    def _data_loader(self) -> DataLoader:
        if self._loader is None:
            workers = self.num_workers
            self._loader = DataLoader(
                _ItemDataset(self),
                batch_sampler=self._batches,
                num_workers=workers,
                collate_fn=_collate,
                persistent_workers=workers > 0,
                prefetch_factor=self.prefetch_factor if workers > 0 else None,
                pin_memory=self.device.type == "cuda",
                # its own generator: the loader would otherwise draw its workers' seed from
                # the global RNG and shift every dropout mask after it (runs would not
                # reproduce the in-memory split's)
                generator=torch.Generator().manual_seed(0),
            )
        return self._loader

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """How many batches ``batches(batch_size, drop_last=...)`` yields."""
        return count_batches(len(self), batch_size, drop_last)


def _collate(samples: list[tuple[dict[str, torch.Tensor] | _ReadFailure, int]]):
    failed = next((s[0] for s in samples if isinstance(s[0], _ReadFailure)), None)
    if failed is not None:
        return failed, []
    names = list(samples[0][0])
    inputs = {m: torch.stack([s[0][m] for s in samples]) for m in names}
    return inputs, [s[1] for s in samples]
