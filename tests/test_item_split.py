"""ItemSplit: media read item by item give the same batches as an in-memory split."""

from __future__ import annotations

import pytest
import torch

from equimodal.data.base import FeatureSplit, MultimodalData
from equimodal.data.items import ItemSplit
from equimodal.data.registry import load_dataset


def as_items(split: FeatureSplit, reads: list | None = None, **kwargs) -> ItemSplit:
    def read(i):
        if reads is not None:
            reads.append(i)
        return {m: x[i] for m, x in split.features.items()}

    shapes = {m: tuple(x.shape[1:]) for m, x in split.features.items()}
    return ItemSplit(
        list(range(len(split))),
        read,
        split.labels,
        shapes,
        present=split.present,
        indices=split.indices,
        **kwargs,
    )


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", seed=0, num_samples=300, num_modalities=2)


def test_same_batches_as_the_in_memory_split(data):
    items = as_items(data.train)
    for shuffle in (False, True):
        a = data.train.batches(32, shuffle, torch.Generator().manual_seed(3), drop_last=True)
        b = items.batches(32, shuffle, torch.Generator().manual_seed(3), drop_last=True)
        pairs = list(zip(a, b, strict=True))
        assert len(pairs) == items.num_batches(32, drop_last=True)
        for x, y in pairs:
            assert torch.equal(x.indices, y.indices) and torch.equal(x.labels, y.labels)
            for m in x.inputs:
                torch.testing.assert_close(x.inputs[m], y.inputs[m])


def test_absent_modalities_are_not_read_and_are_zeros(data):
    split = data.train
    present = {m: p.clone() for m, p in split.present.items()}
    present["m1"][:5] = False
    reads: list = []
    items = ItemSplit(
        list(range(len(split))),
        lambda i: reads.append(i) or {"m0": split.features["m0"][i]},  # m1 is never asked
        split.labels,
        {m: tuple(x.shape[1:]) for m, x in split.features.items()},
        present={"m0": split.present["m0"], "m1": present["m1"]},
    )
    with pytest.raises(ValueError, match="the reader returned no 'm1'"):
        items.read_item(10)
    first = items.read_item(0)
    assert float(first["m1"].abs().sum()) == 0.0


def test_wrong_shape_names_the_item(data):
    split = data.train
    items = ItemSplit(
        [f"clip{i}" for i in range(len(split))],
        lambda i: {"m0": torch.zeros(3)},
        split.labels,
        {"m0": (7,)},
    )
    with pytest.raises(ValueError, match="item 'clip0': modality 'm0' has shape \\(3,\\)"):
        items.read_item(0)


def test_trainer_runs_on_item_splits(data, small_config):
    from equimodal.engine.trainer import Trainer

    disk = MultimodalData(
        data.info, as_items(data.train), as_items(data.val), as_items(data.test), data.options
    )
    config = small_config("joint", 2, ["model.fusion=concat"])
    on_disk = Trainer(config, data=disk, progress=False).fit().metrics["test"]["accuracy"]
    in_memory = Trainer(config, data=data, progress=False).fit().metrics["test"]["accuracy"]
    assert on_disk == pytest.approx(in_memory)
