"""Datasets: shipped values, split protocols, train-only scaling, registry errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.model_selection import train_test_split

from equimodal.data import dataset_names, load_dataset
from equimodal.data.htad import read_htad
from equimodal.data.mfeat import VIEWS, _arrays, tmc_test_indices

DUPLICATES = [(605, 774), (1148, 1172), (1237, 1271), (1265, 1272), (1448, 1521), (1892, 1999)]


def rows(split) -> np.ndarray:
    return split.indices.numpy()


def test_mfeat_shipped_values():
    arrays = _arrays()
    assert {k: arrays[k].shape[1] for k in VIEWS} == VIEWS
    np.testing.assert_array_equal(arrays["labels"], np.arange(2000) // 200)
    for a, b in DUPLICATES:
        for view in VIEWS:
            np.testing.assert_array_equal(arrays[view][a], arrays[view][b])
    # a spot value of the UCI file mfeat-mor, row 0
    np.testing.assert_allclose(arrays["mor"][0], [1, 0, 0, 133.15, 1.3117, 1620.2])


def test_mfeat_tmc_split():
    data = load_dataset("mfeat", seed=0)
    test = rows(data.test)
    np.testing.assert_array_equal(np.sort(test), np.sort(tmc_test_indices()))
    assert len(test) == 400 and len(data.train) == 1440 and len(data.val) == 160
    assert np.bincount(data.test.labels.numpy()).tolist() == [40] * 10
    assert np.bincount(data.val.labels.numpy()).tolist() == [16] * 10
    all_rows = np.concatenate([rows(data.train), rows(data.val), test])
    assert len(np.unique(all_rows)) == 2000
    np.testing.assert_array_equal(data.train.labels.numpy(), rows(data.train) // 200)
    other = load_dataset("mfeat", seed=1)
    np.testing.assert_array_equal(rows(other.test), test)  # the test split is fixed
    assert set(rows(other.val)) != set(rows(data.val))  # validation depends on the seed


def test_mfeat_scaler_is_fit_on_training_rows_only():
    data = load_dataset("mfeat", seed=0)
    fou = data.train.features["fou"]
    torch.testing.assert_close(fou.mean(0), torch.zeros(76), atol=1e-4, rtol=0)
    torch.testing.assert_close(fou.std(0, unbiased=False), torch.ones(76), atol=1e-3, rtol=0)
    raw = _arrays()["fou"]
    train = rows(data.train)
    expected = (raw[rows(data.test)] - raw[train].mean(0)) / raw[train].std(0)
    np.testing.assert_allclose(data.test.features["fou"].numpy(), expected, atol=1e-4)


def test_mfeat_random_protocol_and_views():
    a = load_dataset("mfeat", seed=0, split="random")
    b = load_dataset("mfeat", seed=1, split="random")
    assert len(a.test) == 400 and len(a.train) + len(a.val) == 1600
    assert np.bincount(a.test.labels.numpy()).tolist() == [40] * 10
    assert set(rows(a.test)) != set(rows(b.test))
    sub = load_dataset("mfeat", views=["pix", "mor"])
    assert sub.modalities == ("pix", "mor")
    with pytest.raises(ValueError, match="'pixel'.*fou"):
        load_dataset("mfeat", views=["pixel"])
    with pytest.raises(ValueError, match="tmc, random"):
        load_dataset("mfeat", split="tcm")


def test_mfeat_reproduces_reference_logistic_regression():
    """Reference (shared/reference): LR on standardised views, TMC split: pix 98.75, all 99.25."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    arrays = _arrays()
    test = tmc_test_indices()
    train = np.setdiff1d(np.arange(2000), test)
    y = arrays["labels"]

    def accuracy(x):
        scaler = StandardScaler().fit(x[train])
        model = LogisticRegression(max_iter=5000).fit(scaler.transform(x[train]), y[train])
        return 100 * model.score(scaler.transform(x[test]), y[test])

    assert accuracy(arrays["pix"]) == pytest.approx(98.75, abs=0.01)
    assert accuracy(np.hstack([arrays[v] for v in VIEWS])) == pytest.approx(99.25, abs=0.01)


def test_htad():
    features, labels, classes = read_htad()
    assert features["audio"].shape == (1386, 36) and features["accel"].shape == (1386, 16)
    assert classes == tuple(sorted(classes)) and len(classes) == 7
    for seed in (0, 1):
        data = load_dataset("htad", seed=seed)
        _, expected = train_test_split(
            np.arange(1386), test_size=0.2, stratify=labels, random_state=seed
        )
        np.testing.assert_array_equal(np.sort(rows(data.test)), np.sort(expected))
        assert len(data.val) == pytest.approx((1386 - len(expected)) / 8, abs=1)
        used = np.concatenate([rows(data.train), rows(data.val), rows(data.test)])
        assert len(np.unique(used)) == 1386
        np.testing.assert_array_equal(data.test.labels.numpy(), labels[rows(data.test)])


def test_synthetic_is_deterministic_and_imbalanced():
    from sklearn.linear_model import LogisticRegression

    a = load_dataset("synthetic", seed=0)
    b = load_dataset("synthetic", seed=0)
    torch.testing.assert_close(a.train.features["m0"], b.train.features["m0"])
    scores = {}
    for m in ("m0", "m2"):
        clf = LogisticRegression(max_iter=2000).fit(a.train.features[m], a.train.labels)
        scores[m] = clf.score(a.test.features[m], a.test.labels)
    assert scores["m0"] > 0.9 and scores["m0"] - scores["m2"] > 0.3, scores
    with pytest.raises(ValueError, match="signal has 2 entries for 3 modalities"):
        load_dataset("synthetic", signal=[1.0, 2.0])


def test_synthetic_private_information_needs_fusion():
    from sklearn.linear_model import LogisticRegression

    data = load_dataset("synthetic", seed=0, signal=[4, 4, 4], shared=0.0, num_samples=3000)
    x_train = torch.cat([data.train.features[m] for m in data.modalities], 1)
    x_test = torch.cat([data.test.features[m] for m in data.modalities], 1)
    fused = LogisticRegression(max_iter=2000).fit(x_train, data.train.labels)
    alone = LogisticRegression(max_iter=2000).fit(data.train.features["m0"], data.train.labels)
    assert (
        fused.score(x_test, data.test.labels)
        > alone.score(data.test.features["m0"], data.test.labels) + 0.2
    )


def test_registry_names_and_errors():
    assert {"mfeat", "htad", "synthetic"} <= set(dataset_names())
    with pytest.raises(KeyError, match="did you mean 'mfeat'"):
        load_dataset("mfet")
    with pytest.raises(TypeError, match="did you mean 'split'"):
        load_dataset("mfeat", spilt="tmc")
