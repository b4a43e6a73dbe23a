"""The `features` loader: users' own per-modality files, with clear errors naming file and row."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from equimodal.apps.cli import app
from equimodal.data.registry import load_dataset


def write_dataset(root, n=120, absent_rows=(), split=False):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 3
    a = rng.normal(size=(n, 4)) + labels[:, None]
    b = rng.normal(size=(n, 2, 3))  # extra axes are flattened
    a[list(absent_rows)] = np.nan
    np.save(root / "a.npy", a)
    np.savez(root / "b.npz", features=b)
    (root / "labels.txt").write_text("\n".join(["cat", "dog", "owl"][k] for k in labels) + "\n")
    if split:
        words = ["train"] * (n - 40) + ["val"] * 10 + ["test"] * 30
        (root / "split.txt").write_text("\n".join(words) + "\n")
    return labels


def test_loads_modalities_labels_and_absent_rows(tmp_path):
    write_dataset(tmp_path, absent_rows=(3, 5))
    data = load_dataset("features", seed=0, root=str(tmp_path))
    assert data.modalities == ("a", "b")
    assert data.info.class_names == ("cat", "dog", "owl")
    assert [m.dim for m in data.info.modalities] == [4, 6]
    assert len(data.train) + len(data.val) + len(data.test) == 120
    for split in (data.train, data.val, data.test):
        absent = {int(i) for i, p in zip(split.indices, split.present["a"], strict=True) if not p}
        assert absent == {3, 5} & {int(i) for i in split.indices}
        assert bool(split.present["b"].all())
        assert float(split.features["a"][~split.present["a"]].abs().sum()) == 0.0


def test_split_file_is_followed(tmp_path):
    write_dataset(tmp_path, split=True)
    data = load_dataset("features", seed=0, root=str(tmp_path))
    assert (len(data.train), len(data.val), len(data.test)) == (80, 10, 30)
    assert int(data.test.indices.min()) == 90


def test_mask_file_marks_absence(tmp_path):
    write_dataset(tmp_path)
    mask = np.ones(120, dtype=bool)
    mask[7] = False
    np.savez(tmp_path / "mask.npz", b=mask)
    data = load_dataset("features", seed=1, root=str(tmp_path))
    rows = {
        int(i): bool(p)
        for s in (data.train, data.val, data.test)
        for i, p in zip(s.indices, s.present["b"], strict=True)
    }
    assert rows[7] is False and sum(not v for v in rows.values()) == 1


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: np.save(r / "a.npy", np.ones((119, 4))), "a.npy' has 119 rows but"),
        (lambda r: _poke(r, 9, 1, np.nan), "a.npy': row 9 is partly NaN"),
        (lambda r: _poke(r, 4, 2, np.inf), "a.npy': row 4, column 2 is infinite"),
        (lambda r: (r / "labels.txt").unlink(), "has no labels file"),
        (lambda r: (r / "split.txt").write_text("train\nfoo\n"), "has 2 rows, expected 120"),
        (lambda r: np.save(r / "a.npy", np.array([["x"]] * 120)), "features must be numeric"),
        (lambda r: _all_absent(r, 11), "sample 11 has no modality at all"),
    ],
)
def test_bad_files_are_named(tmp_path, damage, message):
    write_dataset(tmp_path)
    damage(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_dataset("features", seed=0, root=str(tmp_path))


def _poke(root, row, col, value):
    a = np.load(root / "a.npy")
    a[row, col] = value
    np.save(root / "a.npy", a)


def _all_absent(root, row):
    _poke(root, row, slice(None), np.nan)
    mask = np.ones(120, dtype=bool)
    mask[row] = False
    np.savez(root / "mask.npz", b=mask)


def test_train_on_features_from_the_cli_and_bad_root_exits_2(tmp_path):
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    write_dataset(data_dir, absent_rows=(1, 2, 3))
    runner = CliRunner()
    args = [
        "train",
        "-q",
        "--dataset",
        "features",
        "--strategy",
        "joint",
        "--epochs",
        "2",
        "--set",
        f"dataset.options.root={data_dir}",
        "--set",
        "train.relative_edm=false",
        "--out",
        str(tmp_path / "runs"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    bad = runner.invoke(
        app,
        [*args[:-2], "--set", "dataset.options.root=/nonexistent", "--out", str(tmp_path / "bad")],
    )
    assert bad.exit_code == 2 and "/nonexistent" in bad.output
    assert not (tmp_path / "bad").exists()
