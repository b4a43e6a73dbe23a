"""``equimodal.EquimodalClassifier``: the scikit-learn estimator on multi-view tabular data."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from equimodal import EquimodalClassifier

#: small and fast: a fit takes about a second on one CPU core
SMALL = {"epochs": 10, "patience": None, "dim": 16, "hidden": 32, "lr": 1e-2}
#: the two views of ``make_views``: ``a`` carries the class, ``b`` is noise
VIEWS = {"a": [0, 1, 2, 3], "b": slice(4, 7)}


def make_views(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Columns 0-3 (view ``a``) show one of 3 classes; columns 4-6 (view ``b``) are noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    rng.shuffle(y)
    informative = 2.5 * np.eye(3, 4)[y] + rng.normal(size=(n, 4))
    noise = rng.normal(size=(n, 3))
    return np.hstack([informative, noise]), y


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from more threads; on a busy machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    X, y = make_views(300)
    return X[:240], y[:240], X[240:], y[240:]


@pytest.fixture(scope="module")
def fitted(data):
    X, y, _, _ = data
    return EquimodalClassifier(views=VIEWS, **SMALL).fit(X, y)


# --------------------------------------------------------------------------- basics
def test_fit_predict_shapes_and_learning(fitted, data):
    _, _, X_test, y_test = data
    proba = fitted.predict_proba(X_test)
    assert proba.shape == (len(X_test), 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
    pred = fitted.predict(X_test)
    assert pred.shape == (len(X_test),)
    np.testing.assert_array_equal(pred, fitted.classes_[proba.argmax(1)])
    assert fitted.score(X_test, y_test) > 0.7  # chance is 1/3
    assert fitted.n_features_in_ == 7
    assert fitted.view_names_ == ("a", "b")
    np.testing.assert_array_equal(fitted.view_columns_["b"], [4, 5, 6])
    assert fitted.strategy_ == "shapley_alternating"
    # the informative view carries the accuracy on the hold-out
    assert set(fitted.shapley_values_) == {"a", "b"}
    assert fitted.shapley_values_["a"] > fitted.shapley_values_["b"]
    assert 0.0 <= fitted.edm_ <= 1.0
    assert len(fitted.history_) == SMALL["epochs"] + 1  # row 0: before training
    assert fitted.history_[0]["epoch"] == 0
    assert fitted.metrics_["val"]["num_samples"] == 24  # val_fraction 0.1 of 240
    assert fitted.metrics_["test"] == {}  # the hold-out is never scored as a test split


def test_string_labels(data):
    X, y, X_test, y_test = data
    names = np.array(["cat", "dog", "emu"])
    clf = EquimodalClassifier(views=VIEWS, **SMALL).fit(X, names[y])
    np.testing.assert_array_equal(clf.classes_, names)
    pred = clf.predict(X_test)
    assert pred.dtype == names.dtype and set(pred) <= set(names)
    assert clf.score(X_test, names[y_test]) > 0.7


def test_dict_input(data):
    X, y, X_test, y_test = data

    def split(x):
        return {"a": x[:, :4], "b": x[:, 4:]}

    clf = EquimodalClassifier(**SMALL).fit(split(X), y)
    assert clf.view_names_ == ("a", "b") and clf.view_columns_ is None
    assert clf.view_dims_ == {"a": 4, "b": 3} and clf.n_features_in_ == 7
    assert clf.score(split(X_test), y_test) > 0.7
    with pytest.raises(ValueError, match="dict of views"):
        clf.predict(X_test)
    with pytest.raises(ValueError, match="view 'b' is missing"):
        clf.predict({"a": X_test[:, :4]})
    with pytest.raises(ValueError, match="view 'b' has 2 columns"):
        clf.predict({"a": X_test[:, :4], "b": X_test[:, 4:6]})
    with pytest.raises(ValueError, match="different numbers of rows"):
        clf.fit({"a": X[:, :4], "b": X[:-1, 4:]}, y)
    with pytest.raises(ValueError, match="views is for a 2-D X"):
        EquimodalClassifier(views=VIEWS).fit(split(X), y)


def test_array_fit_predicts_from_a_dict(fitted, data):
    _, _, X_test, _ = data
    views = {"a": X_test[:, :4], "b": X_test[:, 4:]}
    np.testing.assert_allclose(fitted.predict_proba(views), fitted.predict_proba(X_test))


# --------------------------------------------------------------------------- scikit-learn
def test_pipeline_with_scaler(data):
    X, y, X_test, y_test = data
    pipe = make_pipeline(StandardScaler(), EquimodalClassifier(views=VIEWS, **SMALL))
    pipe.fit(100.0 * X + 7.0, y)  # views by column index survive scaling
    assert pipe.score(100.0 * X_test + 7.0, y_test) > 0.7


def test_cross_val_score(data):
    X, y, _, _ = data
    scores = cross_val_score(EquimodalClassifier(views=VIEWS, **SMALL), X, y, cv=2)
    assert scores.shape == (2,) and scores.min() > 0.6


def test_grid_search_over_strategy(data):
    X, y, _, _ = data
    small = {**SMALL, "epochs": 3}
    search = GridSearchCV(
        EquimodalClassifier(views=VIEWS, **small),
        {"strategy": ["joint", "shapley_alternating"]},
        cv=2,
    ).fit(X, y)
    assert search.best_params_["strategy"] in ("joint", "shapley_alternating")
    assert search.best_estimator_.strategy_ == search.best_params_["strategy"]
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()


def test_clone_get_and_set_params(fitted):
    copy = clone(fitted)
    assert not hasattr(copy, "model_") and not hasattr(copy, "classes_")
    assert copy.get_params() == fitted.get_params()
    params = EquimodalClassifier().get_params()
    assert params["strategy"] == "shapley_alternating" and params["views"] is None
    assert copy.set_params(strategy="joint", epochs=2) is copy
    assert copy.strategy == "joint" and copy.epochs == 2 and fitted.strategy != "joint"


#: the common checks' data: 2 to 10 columns, up to 300 rows; 8 epochs reach their 0.83
#: training accuracy on 3 blobs
CHECKED = EquimodalClassifier(epochs=8, patience=None, dim=8, hidden=16, lr=1e-2, batch_size=32)


@parametrize_with_checks([CHECKED])
def test_sklearn_checks(estimator, check):
    check(estimator)


# --------------------------------------------------------------------------- views
def test_default_views():
    X, y = make_views(120)
    clf = EquimodalClassifier(**{**SMALL, "epochs": 2})
    assert clf.fit(X[:, :3], y).view_names_ == ("x0", "x1", "x2")  # a view per column
    wide = np.hstack([X, X, X[:, :2]])  # 16 columns: 8 groups of 2
    names = clf.fit(wide, y).view_names_
    assert len(names) == 8 and names[0] == "x0-x1" and names[-1] == "x14-x15"
    assert clf.set_params(views=2).fit(X, y).view_names_ == ("x0-x3", "x4-x6")


def test_dataframe_column_names(data):
    pd = pytest.importorskip("pandas")
    X, y, X_test, y_test = data
    columns = [f"a{i}" for i in range(4)] + [f"b{i}" for i in range(3)]
    frame, test_frame = pd.DataFrame(X, columns=columns), pd.DataFrame(X_test, columns=columns)
    views = {"a": columns[:4], "b": ["b0", "b1", "b2"]}
    clf = EquimodalClassifier(views=views, **SMALL).fit(frame, y)
    np.testing.assert_array_equal(clf.feature_names_in_, columns)
    np.testing.assert_array_equal(clf.view_columns_["b"], [4, 5, 6])
    assert clf.score(test_frame, y_test) > 0.7
    with pytest.raises(ValueError, match="X has no column named 'c0'"):
        EquimodalClassifier(views={"a": ["c0"]}).fit(frame, y)


def test_small_classes():
    X, y = make_views(60)
    y = y.copy()
    y[7] = 3  # a class of one sample stays in training, out of the stratified hold-out
    clf = EquimodalClassifier(views=VIEWS, **{**SMALL, "epochs": 2}).fit(X, y)
    np.testing.assert_array_equal(clf.classes_, [0, 1, 2, 3])
    assert clf.predict_proba(X).shape == (60, 4)
    with pytest.raises(ValueError, match="every class has a single sample"):
        EquimodalClassifier(views=VIEWS, epochs=1).fit(X[:3], [0, 1, 2])


def test_single_view_trains_joint():
    X, y = make_views(120)
    with pytest.warns(UserWarning, match="nothing to balance"):
        clf = EquimodalClassifier(views={"a": slice(0, 4)}, **SMALL).fit(X, y)
    assert clf.strategy_ == "joint" and clf.edm_ is None and clf.shapley_shares_ is None
    assert set(clf.shapley_values_) == {"a"} and clf.shapley_values_["a"] > 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for joint: no warning
        EquimodalClassifier(views={"a": slice(0, 4)}, strategy="joint", epochs=1).fit(X, y)
    with pytest.raises(ValueError, match="unknown strategy"):  # a typo is still one
        EquimodalClassifier(views={"a": [0]}, strategy="shapley_alternatin").fit(X, y)


@pytest.mark.parametrize(
    ("views", "message"),
    [
        ({"a": [0, 9]}, "view 'a': column 9 is out of range for X with 7 columns"),
        ({"a": [1, 1]}, "view 'a' names column 1 twice"),
        ({"a": slice(7, 9)}, "view 'a' selects no column"),
        ({"a.b": [0]}, "holds a '.'"),
        ({"a": ["age"]}, "X has no column names"),
        ({"a": [0.5]}, "view 'a': columns must be integer indices"),
        ({}, "views is empty"),
        (9, "views=9 needs 1 to 7 column groups"),
        ("ab", "views must be None"),
    ],
)
def test_bad_views(views, message):
    X, y = make_views(60)
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        EquimodalClassifier(views=views, epochs=1).fit(X, y)


def test_bad_parameters():
    X, y = make_views(60)
    with pytest.raises(ValueError, match="val_fraction must be a number in"):
        EquimodalClassifier(val_fraction=1.5, epochs=1).fit(X, y)
    with pytest.raises(ValueError, match="parameter strategy: unknown strategy"):
        EquimodalClassifier(strategy="shapley_alternatin", epochs=1).fit(X, y)
    with pytest.raises(ValueError, match="parameter lr: Input should be greater than 0"):
        EquimodalClassifier(lr=-1.0).fit(X, y)
    with pytest.raises(ValueError, match="parameter strategy_options: order_by"):
        EquimodalClassifier(strategy_options={"order_by": "size"}).fit(X, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        EquimodalClassifier(epochs=1).fit(X, np.zeros(60))


def test_nan_rows_are_absent_views(data):
    X, y, X_test, _ = data
    X = X.copy()
    X[::5, 4:] = np.nan  # view b absent for a fifth of the samples
    clf = EquimodalClassifier(views=VIEWS, **SMALL).fit(X, y)
    X_test = X_test.copy()
    X_test[:10, :4] = np.nan  # view a absent: predicted from b alone
    proba = clf.predict_proba(X_test)
    assert np.isfinite(proba).all() and proba.shape == (len(X_test), 3)
    partly = X_test.copy()
    partly[3, 5] = np.nan
    with pytest.raises(ValueError, match=r"view 'b': row 3 is partly NaN \(column 5 of X\)"):
        clf.predict(partly)
    nothing = X_test.copy()
    nothing[2, :] = np.nan
    with pytest.raises(ValueError, match="row 2 has no view at all"):
        clf.predict(nothing)
    with pytest.raises(ValueError, match="infinity"):
        clf.predict(np.where(np.arange(7) == 1, np.inf, X_test))


def test_out_writes_the_run_folder(tmp_path, data):
    X, y, _, _ = data
    out = tmp_path / "run"
    clf = EquimodalClassifier(views=VIEWS, out=str(out), **{**SMALL, "epochs": 2}).fit(X, y)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val"]["shapley"] == pytest.approx(clf.shapley_values_)
    assert len((out / "history.jsonl").read_text().splitlines()) == 3
    assert (out / "checkpoints" / "best.safetensors").is_file()


def test_fit_is_reproducible_and_keeps_global_state(data):
    X, y, X_test, _ = data
    np.random.seed(123)
    torch.manual_seed(123)
    before = (np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    deterministic = torch.are_deterministic_algorithms_enabled()
    first = EquimodalClassifier(views=VIEWS, **SMALL).fit(X, y).predict_proba(X_test)
    assert np.array_equal(np.random.get_state()[1], before[0])
    assert torch.equal(torch.get_rng_state(), before[1])
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    second = EquimodalClassifier(views=VIEWS, **SMALL).fit(X, y).predict_proba(X_test)
    np.testing.assert_array_equal(first, second)


def test_import_equimodal_stays_light():
    code = (
        "import sys, equimodal; assert 'torch' not in sys.modules; "
        "assert 'sklearn' not in sys.modules; "
        "assert equimodal.EquimodalClassifier.__name__ == 'EquimodalClassifier'; "
        "assert 'EquimodalClassifier' in dir(equimodal)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_defaults_learn():
    """The default settings (up to 100 epochs, early stopping: a few seconds)."""
    X, y = make_views(600)
    clf = EquimodalClassifier(views=VIEWS).fit(X[:480], y[:480])
    assert clf.score(X[480:], y[480:]) > 0.8
    assert clf.shapley_values_["a"] > clf.shapley_values_["b"]
