"""``EquimodalClassifier``: a scikit-learn estimator for multi-view tabular data.

The views (modalities) are column groups of one 2-D ``X`` (``views={"a": [0, 1], "b":
slice(2, 6)}``) or the arrays of a dict ``X`` (``fit({"a": Xa, "b": Xb}, y)``). ``fit``
holds out a stratified ``val_fraction`` of the rows for checkpoint selection, early
stopping and the Shapley values, and trains through :class:`~equimodal.engine.trainer.
Trainer` with any registered strategy; the model stays in memory (a run folder only with
``out``). An integer ``views=k`` cuts the columns of a 2-D ``X`` into ``k`` contiguous,
near-equal groups (``x0-x3``, ``x4-x7``, ...); ``views=None`` is ``views=min(columns, 8)``:
every column its own view (``x0``, ``x1``, ...) up to 8 columns, wider ``X`` in 8 groups.
Views that follow the data's sources (a mapping) are what balancing is meant for.

A view is absent for a sample when its whole row is NaN (a partly NaN row is an error).
With a single view there is nothing to balance: the estimator trains ``joint`` (several
balancing methods refuse one modality) and says so in a warning when another strategy
was asked for; ``strategy_`` records what was trained.

``fit`` leaves the global random states of Python, NumPy and torch and torch's
deterministic-algorithms setting as it found them (the trainer seeds and sets them).
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, column_or_1d

from equimodal.config import DEFAULT_STRATEGY, MAX_SEED, ConfigError, build_config
from equimodal.data.base import DatasetInfo, FeatureSplit, ModalitySpec
from equimodal.data.features import TORCH_NAMES
from equimodal.data.splits import build_data
from equimodal.engine.build import rng_state, set_rng_state
from equimodal.engine.trainer import Trainer
from equimodal.engine.validation import (
    class_prior,
    encode_split,
    predict_logits,
    value_of_prior,
)
from equimodal.strategies.joint import JointStrategy

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn

    def _validate_data(estimator, X="no_validation", y="no_validation", reset=True, **params):
        return estimator._validate_data(X, y, reset=reset, **params)


#: check_array's option for NaN handling: renamed in scikit-learn 1.6
_FINITE = (
    "ensure_all_finite"
    if "ensure_all_finite" in inspect.signature(check_array).parameters
    else "force_all_finite"
)
#: ``views=None`` on a 2-D X: one view per column up to this many columns, else this many
#: contiguous column groups (Shapley values are exact, over 2^8 coalitions, up to 8 views;
#: beyond, sampling makes each epoch many times slower)
MAX_AUTO_VIEWS = 8
#: the strategy trained when there is a single view (nothing to balance)
SINGLE_VIEW_STRATEGY = JointStrategy.name
#: how a config error begins -> the constructor parameter it is about
_PARAMETER_OF = {
    "strategy: unknown strategy": "strategy",
    "strategy:": "strategy_options",
    "model.fusion:": "fusion",
    "model.dim:": "dim",
    "model.encoder: encoder 'mlp': hidden:": "hidden",
    "model.encoder: encoder 'mlp': dropout:": "dropout",
    "optim.lr:": "lr",
    "optim.weight_decay:": "weight_decay",
    "train.epochs:": "epochs",
    "train.patience:": "patience",
    "train.batch_size:": "batch_size",
    "train.device:": "device",
}


def _group_name(columns: np.ndarray) -> str:
    """``x3`` for column 3, ``x0-x3`` for columns 0 to 3."""
    first, last = int(columns[0]), int(columns[-1])
    return f"x{first}" if first == last else f"x{first}-x{last}"


def _is_view_dict(X: object) -> bool:
    """Whether ``X`` is a dict of views (a sparse DOK matrix is a Mapping too)."""
    return isinstance(X, Mapping) and not scipy.sparse.issparse(X)


class EquimodalClassifier(ClassifierMixin, BaseEstimator):
    """A balanced multimodal classifier on column groups (views) of tabular data.

    Parameters
    ----------
    views : None, int or mapping {name: columns}
        How a 2-D ``X`` splits into views. A mapping gives each view's columns as a list of
        column indices, a slice, a boolean mask or, for a DataFrame ``X``, column names.
        An integer ``k``: ``k`` contiguous, near-equal groups of columns (named by their
        columns: ``x0-x3``, or ``x4`` for a single column). ``None``: ``min(n_columns,
        8)`` groups, so every column is its own view up to 8 columns (exact Shapley
        values stay cheap up to 8 views). Leave ``None`` when ``X`` is a dict ``{view:
        2-D array}``. Columns may be left out of every view (they are ignored) or be in
        several.
    strategy : str
        A registered training method (``equimodal strategies`` lists them).
    strategy_options : dict or None
        The strategy's options (``strategy.<key>`` of a run config).
    fusion : str or None
        A registered fusion; None: the strategy's default.
    epochs : int
        The most epochs of the training loop (``train.epochs``).
    patience : int or None
        Early stopping's patience in epochs (``train.patience``); None turns it off.
    batch_size : int
        The training batch size (``train.batch_size``).
    lr : float
        AdamW's learning rate (``optim.lr``).
    weight_decay : float
        AdamW's weight decay (``optim.weight_decay``).
    dim : int
        Common feature width (``model.dim``).
    hidden : int
        The MLP encoders' hidden width (``model.encoder.hidden``).
    dropout : float
        The MLP encoders' dropout (``model.encoder.dropout``).
    standardize : bool
        Z-score each column with the mean and standard deviation of the present training
        rows (the same statistics are applied at prediction).
    val_fraction : float in (0, 1)
        The stratified share of the rows held out for checkpoint selection, early
        stopping and the Shapley values (at least one row per class with two or more
        samples; classes with a single sample stay in training).
    overrides : list of str or None
        Further run-config settings as ``key.path=value`` (``equimodal train --set``).
    random_state : int, RandomState or None
        Seeds the hold-out and the training (an int is the run's ``seed``).
    device : str
        ``cpu``, ``cuda``, ``mps`` or ``auto``.
    out : path or None
        A folder that receives the run's files (``config.yaml``, ``history.jsonl``,
        ``metrics.json``, ``checkpoints/``); None writes nothing.
    verbose : bool
        Show the trainer's progress bar.

    Attributes
    ----------
    classes_ : ndarray
        The class labels (any type; encoded with a LabelEncoder).
    n_features_in_ : int
        Columns of ``X`` (for a dict ``X``, the total columns of its views).
    view_names_ : tuple of str
    view_columns_ : dict {view: ndarray of column indices} (None for a dict ``X``)
    view_dims_ : dict {view: number of columns}
    strategy_ : str
        The strategy trained (``joint`` with a single view).
    shapley_values_ : dict {view: float}
        Each view's Shapley value of validation accuracy (on the hold-out), from the
        trainer's final report; with one view, its accuracy minus the class prior's.
    shapley_shares_ : dict {view: float} or None
    edm_ : float or None
        Equilibrium Deviation Metric on the hold-out (0 balanced, 1 one view carries
        everything); None with a single view.
    history_ : list of dict
        The trainer's per-epoch history (row 0: before training).
    metrics_ : dict
        The trainer's final metrics (``val``: the hold-out's scores).
    best_epoch_ : int
    means_ : dict {view: ndarray}
        The mean of each view's columns used to standardise them (0 without
        ``standardize``).
    scales_ : dict {view: ndarray}
        The standard deviation of each view's columns used to standardise them (1 without
        ``standardize``, and for a constant column).
    config_ : RunConfig
        The run's resolved config (``dataset.name`` is ``estimator``: a run folder written
        with ``out`` holds no data, so ``equimodal evaluate`` cannot reload it).
    model_ : MultimodalModel
        The selected model (best validation epoch), in eval mode.
    inference_ : dict
        How the model predicts (the strategy's inference options, e.g. hybrid orders).
    """

    def __init__(
        self,
        views=None,
        strategy=DEFAULT_STRATEGY,
        strategy_options=None,
        fusion=None,
        epochs=100,
        patience=15,
        batch_size=64,
        lr=1e-3,
        weight_decay=1e-4,
        dim=128,
        hidden=256,
        dropout=0.1,
        standardize=True,
        val_fraction=0.1,
        overrides=None,
        random_state=0,
        device="cpu",
        out=None,
        verbose=False,
    ):
        self.views = views
        self.strategy = strategy
        self.strategy_options = strategy_options
        self.fusion = fusion
        self.epochs = epochs
        self.patience = patience
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.dim = dim
        self.hidden = hidden
        self.dropout = dropout
        self.standardize = standardize
        self.val_fraction = val_fraction
        self.overrides = overrides
        self.random_state = random_state
        self.device = device
        self.out = out
        self.verbose = verbose

    # ------------------------------------------------------------------ tags
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True  # a wholly NaN view row: that view is absent
        return tags

    def _more_tags(self):  # scikit-learn < 1.6
        return {"allow_nan": True}

    # ------------------------------------------------------------------ fit
    def fit(self, X, y):
        """Train on ``X`` (2-D array with ``views``, or dict ``{view: 2-D array}``) and ``y``."""
        arrays, y = self._fit_input(X, y)
        self._check_params()
        seed = self._seed()
        names = tuple(arrays)
        strategy = self.strategy
        if len(names) == 1 and strategy != SINGLE_VIEW_STRATEGY:
            self._config(strategy, seed)  # the settings asked for must still be valid
            warnings.warn(
                f"one view ({names[0]!r}): nothing to balance, so {type(self).__name__} "
                f"trains {SINGLE_VIEW_STRATEGY!r} instead of {strategy!r}; give two or more "
                "views to balance them",
                UserWarning,
                stacklevel=2,
            )
            strategy = SINGLE_VIEW_STRATEGY
        config = self._config(strategy, seed)
        encoder = LabelEncoder()
        labels = encoder.fit_transform(y).astype(np.int64)
        classes = encoder.classes_
        if len(classes) < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes; got 1 class "
                f"({classes[0]!r})"
            )
        n = labels.shape[0]
        present = {name: self._presence(name, x) for name, x in arrays.items()}
        self._check_some_view(present)
        train, val = self._holdout(labels, classes, seed)
        self.means_ = {}
        self.scales_ = {}
        for name, x in arrays.items():
            fit_rows = train[present[name][train]]
            if len(fit_rows) == 0:
                raise ValueError(
                    f"view {name!r} is absent (all NaN) in every training row; give it data "
                    "or leave it out"
                )
            self.means_[name], self.scales_[name] = self._statistics(name, x[fit_rows])
        features = {name: self._scaled(name, x, present[name]) for name, x in arrays.items()}
        info = DatasetInfo(
            name="estimator",
            modalities=tuple(ModalitySpec(m, (features[m].shape[1],)) for m in names),
            num_classes=len(classes),
            num_samples=n,
            source=f"{type(self).__name__}.fit",
            license="yours",
            class_names=tuple(str(c) for c in classes),
        )
        # score_test is off: the hold-out doubles as the (never read) test split
        rows = {"train": train, "val": val, "test": val}
        data = build_data(info, features, labels, rows, standardize=False, present=present)
        result = self._train(config, data)

        self.classes_ = classes
        self.config_ = config
        self.strategy_ = strategy
        self.model_ = result.model.eval()
        self.inference_ = result.strategy.inference_kwargs()
        self.history_ = result.history
        self.metrics_ = result.metrics
        self.best_epoch_ = int(result.metrics["best_epoch"])
        report = result.metrics["val"]
        if "shapley" in report:
            self.shapley_values_ = {m: float(report["shapley"][m]) for m in names}
            self.shapley_shares_ = {m: float(report["shapley_share"][m]) for m in names}
            self.edm_ = float(report["edm"])
        else:  # one player: its Shapley value is v({m}) - v(empty)
            val_labels = torch.from_numpy(labels[val])
            prior = class_prior(torch.from_numpy(labels[train]), len(classes))
            empty = value_of_prior(prior, val_labels, "accuracy")
            self.shapley_values_ = {names[0]: float(report["accuracy"]) - empty}
            self.shapley_shares_ = None
            self.edm_ = None
        return self

    def _train(self, config, data):
        """``Trainer.fit`` with the caller's global random states and torch settings kept."""
        saved_rng = rng_state()
        deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        try:
            trainer = Trainer(config, data=data, run_dir=self.out, progress=bool(self.verbose))
            return trainer.fit()
        finally:
            set_rng_state(saved_rng)
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)

    def _config(self, strategy: str, seed: int):
        options = dict(self.strategy_options or {})
        if "name" in options:
            raise ValueError(
                "strategy_options must not hold 'name'; the strategy is the strategy parameter"
            )
        if strategy != self.strategy:
            options = {}  # the options were for the strategy asked for
        model: dict[str, Any] = {
            "dim": self.dim,
            "encoder": {"kind": "mlp", "hidden": self.hidden, "dropout": self.dropout},
        }
        if self.fusion is not None:
            model["fusion"] = self.fusion
        base = {
            "seed": seed,
            "dataset": {"name": "estimator"},
            "strategy": {**options, "name": strategy},
            "model": model,
            "optim": {"lr": self.lr, "weight_decay": self.weight_decay},
            "train": {
                "epochs": self.epochs,
                "patience": self.patience,
                "batch_size": self.batch_size,
                "device": self.device,
                "relative_edm": False,
                "score_test": False,
            },
        }
        overrides = self.overrides or ()
        if isinstance(overrides, str):
            overrides = [overrides]
        try:
            return build_config(base, list(overrides))
        except ConfigError as err:
            message = str(err)
            for start, parameter in _PARAMETER_OF.items():
                if message.startswith(start):
                    cut = len(start) if start.endswith(":") else message.index(":") + 1
                    detail = message[cut:].strip()
                    message = f"parameter {parameter}: {detail}"
                    break
            raise ValueError(f"{type(self).__name__} {message}") from None

    def _check_params(self) -> None:
        fraction = self.val_fraction
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, numbers.Real)
            or not 0.0 < float(fraction) < 1.0
        ):
            raise ValueError(f"val_fraction must be a number in (0, 1), got {fraction!r}")
        if not isinstance(self.standardize, (bool, np.bool_)):
            raise ValueError(f"standardize must be True or False, got {self.standardize!r}")
        if self.out is not None and not isinstance(self.out, (str, os.PathLike)):
            raise ValueError(f"out must be a folder path or None, got {self.out!r}")

    def _seed(self) -> int:
        state = self.random_state
        if isinstance(state, numbers.Integral) and not isinstance(state, bool):
            if not 0 <= int(state) <= MAX_SEED:
                raise ValueError(f"random_state must be in [0, {MAX_SEED}], got {state}")
            return int(state)
        return int(check_random_state(state).randint(0, 2**31 - 1))

    def _holdout(
        self, labels: np.ndarray, classes: np.ndarray, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Stratified (train, val) rows; classes with one sample stay in training."""
        counts = np.bincount(labels, minlength=len(classes))
        eligible = np.flatnonzero(counts[labels] >= 2)
        groups = int((counts >= 2).sum())
        if groups == 0:
            raise ValueError(
                "cannot hold out a validation set: every class has a single sample "
                f"({len(labels)} samples, {len(classes)} classes)"
            )
        n_val = max(math.ceil(float(self.val_fraction) * len(labels)), groups)
        n_val = min(n_val, len(eligible) - groups)  # training keeps every class
        kept, held = train_test_split(
            eligible, test_size=n_val, stratify=labels[eligible], random_state=seed
        )
        train = np.sort(np.concatenate([kept, np.flatnonzero(counts[labels] < 2)]))
        return train.astype(np.int64), np.sort(held).astype(np.int64)

    # ------------------------------------------------------------------ inputs
    def _fit_input(self, X, y) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The views' float64 arrays and the 1-D labels; sets the view attributes."""
        if _is_view_dict(X):
            if self.views is not None:
                raise ValueError(
                    "views is for a 2-D X; a dict X names its views by its keys (leave views=None)"
                )
            if y is None:
                raise ValueError(
                    f"{type(self).__name__} requires y to be passed, but the target y is None"
                )
            arrays = self._dict_arrays(X)
            y = column_or_1d(np.asarray(y), warn=True)
            check_classification_targets(y)
            n = next(iter(arrays.values())).shape[0]
            if y.shape[0] != n:
                raise ValueError(f"X has {n} rows but y has {y.shape[0]} labels")
            self.view_columns_ = None
            self.view_dims_ = {m: int(x.shape[1]) for m, x in arrays.items()}
            self.n_features_in_ = int(sum(self.view_dims_.values()))
            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
        else:
            X, y = _validate_data(self, X, y, dtype=np.float64, **{_FINITE: "allow-nan"})
            check_classification_targets(y)
            self.view_columns_ = self._resolve_views(X.shape[1])
            arrays = {m: X[:, cols] for m, cols in self.view_columns_.items()}
            self.view_dims_ = {m: len(cols) for m, cols in self.view_columns_.items()}
        self.view_names_ = tuple(arrays)
        return arrays, y

    def _predict_input(self, X) -> dict[str, np.ndarray]:
        check_is_fitted(self, "model_")
        if _is_view_dict(X):
            missing = [m for m in self.view_names_ if m not in X]
            extra = [m for m in X if m not in self.view_names_]
            if missing or extra:
                raise ValueError(
                    f"X must hold the views {', '.join(map(repr, self.view_names_))}; "
                    + (f"view {missing[0]!r} is missing" if missing else f"{extra[0]!r} is not one")
                )
            arrays = self._dict_arrays({m: X[m] for m in self.view_names_})
            for m, x in arrays.items():
                if x.shape[1] != self.view_dims_[m]:
                    raise ValueError(
                        f"view {m!r} has {x.shape[1]} columns, but {type(self).__name__} was "
                        f"fitted with {self.view_dims_[m]}"
                    )
            return arrays
        if self.view_columns_ is None:
            raise ValueError(
                f"{type(self).__name__} was fitted on a dict of views; pass a dict with the "
                f"views {', '.join(map(repr, self.view_names_))}"
            )
        X = _validate_data(self, X, reset=False, dtype=np.float64, **{_FINITE: "allow-nan"})
        return {m: X[:, cols] for m, cols in self.view_columns_.items()}

    @staticmethod
    def _check_view_name(name: object) -> str:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a view's name must be a non-empty string, got {name!r}")
        if "." in name or name in TORCH_NAMES:
            why = "holds a '.'" if "." in name else "is reserved by torch"
            raise ValueError(f"the view name {name!r} {why}; rename the view")
        return name

    def _dict_arrays(self, X: Mapping) -> dict[str, np.ndarray]:
        if not X:
            raise ValueError("X is an empty dict; give at least one view {name: 2-D array}")
        arrays: dict[str, np.ndarray] = {}
        for name, value in X.items():
            self._check_view_name(name)
            try:
                x = check_array(value, dtype=np.float64, estimator=self, **{_FINITE: "allow-nan"})
            except (TypeError, ValueError) as err:
                raise type(err)(f"view {name!r}: {err}") from None
            arrays[name] = x
        rows = {name: x.shape[0] for name, x in arrays.items()}
        if len(set(rows.values())) > 1:
            shown = ", ".join(f"{m!r}: {r}" for m, r in rows.items())
            raise ValueError(f"the views have different numbers of rows ({shown})")
        return arrays

    def _resolve_views(self, n_features: int) -> dict[str, np.ndarray]:
        """``views`` as {name: column indices} for a 2-D X of ``n_features`` columns."""
        views = self.views
        if views is None:
            views = min(n_features, MAX_AUTO_VIEWS)
        if isinstance(views, numbers.Integral) and not isinstance(views, bool):
            if not 1 <= int(views) <= n_features:
                raise ValueError(
                    f"views={int(views)} needs 1 to {n_features} column groups: X has "
                    f"{n_features} feature(s)"
                )
            parts = np.array_split(np.arange(n_features), int(views))
            return {_group_name(part): part for part in parts}
        if not isinstance(views, Mapping):
            raise ValueError(
                "views must be None, a number of column groups or a mapping {view: columns}, "
                f"got {type(views).__name__}"
            )
        if not views:
            raise ValueError("views is empty; name at least one view")
        return {
            self._check_view_name(name): self._columns(name, spec, n_features)
            for name, spec in views.items()
        }

    def _columns(self, name: str, spec: object, n_features: int) -> np.ndarray:
        """The column indices of view ``name`` (indices, slice, boolean mask or names)."""
        if isinstance(spec, slice):
            columns = np.arange(n_features)[spec]
        else:
            if isinstance(spec, (str, numbers.Integral)):
                spec = [spec]
            try:
                items = np.asarray(list(spec))  # type: ignore[call-overload]
            except TypeError:
                raise ValueError(
                    f"view {name!r}: columns must be a list of column indices, a slice, a "
                    f"boolean mask or column names, got {type(spec).__name__}"
                ) from None
            if items.dtype.kind == "b":
                if items.shape != (n_features,):
                    raise ValueError(
                        f"view {name!r}: a boolean mask needs {n_features} entries (one per "
                        f"column of X), got {items.size}"
                    )
                columns = np.flatnonzero(items)
            elif items.dtype.kind in "UO" and all(isinstance(c, str) for c in items):
                wanted = [str(c) for c in items]
                names = getattr(self, "feature_names_in_", None)
                if names is None:
                    raise ValueError(
                        f"view {name!r} names columns ({wanted[0]!r}, ...), but X has no column "
                        "names (give column indices, or a DataFrame X)"
                    )
                position = {str(c): k for k, c in enumerate(names)}
                unknown = [c for c in wanted if c not in position]
                if unknown:
                    raise ValueError(f"view {name!r}: X has no column named {unknown[0]!r}")
                columns = np.array([position[c] for c in wanted], dtype=np.int64)
            elif items.dtype.kind in "iu":
                bad = items[(items < -n_features) | (items >= n_features)]
                if bad.size:
                    raise ValueError(
                        f"view {name!r}: column {int(bad[0])} is out of range for X with "
                        f"{n_features} columns"
                    )
                columns = np.where(items < 0, items + n_features, items)
            else:
                raise ValueError(
                    f"view {name!r}: columns must be integer indices, a slice, a boolean mask "
                    f"or column names, got {items.tolist()[:6]!r}"
                )
        columns = np.asarray(columns, dtype=np.int64)
        if columns.size == 0:
            raise ValueError(f"view {name!r} selects no column")
        unique, counts = np.unique(columns, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"view {name!r} names column {int(unique[counts > 1][0])} twice")
        return columns

    def _column_label(self, name: str, column: int) -> str:
        """How an error names column ``column`` of view ``name``."""
        columns = getattr(self, "view_columns_", None)
        if columns is not None and name in columns:
            return f"column {int(columns[name][column])} of X"
        return f"its column {column}"

    def _presence(self, name: str, x: np.ndarray) -> np.ndarray:
        """Rows where view ``name`` is present; a partly NaN row is an error."""
        nan = np.isnan(x)
        absent = nan.all(axis=1)
        partial = nan.any(axis=1) & ~absent
        if partial.any():
            row = int(np.argmax(partial))
            column = int(np.argmax(nan[row]))
            raise ValueError(
                f"view {name!r}: row {row} is partly NaN ({self._column_label(name, column)}); "
                f"a wholly NaN row marks the view absent for that sample, a partly NaN one is "
                f"an error ({int(partial.sum())} such rows)"
            )
        return ~absent

    @staticmethod
    def _check_some_view(present: dict[str, np.ndarray]) -> None:
        nobody = ~np.stack(list(present.values()), 1).any(1)
        if nobody.any():
            raise ValueError(
                f"row {int(np.argmax(nobody))} has no view at all (all of "
                f"{', '.join(map(repr, present))} are NaN); {int(nobody.sum())} such rows"
            )

    def _statistics(self, name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and scale of the present training rows (identity without ``standardize``)."""
        if not self.standardize:
            return np.zeros(x.shape[1]), np.ones(x.shape[1])
        with np.errstate(over="ignore", invalid="ignore"):
            mean, scale = x.mean(axis=0), x.std(axis=0)
        bad = ~np.isfinite(mean) | ~np.isfinite(scale)
        if bad.any():
            column = int(np.argmax(bad))
            raise ValueError(
                f"view {name!r}: {self._column_label(name, column)} holds values too large to "
                "standardise in float64; rescale it"
            )
        scale[scale == 0] = 1.0
        return mean, scale

    def _scaled(self, name: str, x: np.ndarray, present: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            z = (np.nan_to_num(x) - self.means_[name]) / self.scales_[name]
        return np.where(present[:, None], z, 0.0)

    # ------------------------------------------------------------------ predict
    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, columns in the order of ``classes_``."""
        arrays = self._predict_input(X)
        present = {m: self._presence(m, x) for m, x in arrays.items()}
        self._check_some_view(present)
        features = {}
        for m, x in arrays.items():
            z = self._scaled(m, x, present[m]).astype(np.float32)
            bad = ~np.isfinite(z)
            if bad.any():
                row, column = (int(i) for i in np.argwhere(bad)[0])
                raise ValueError(
                    f"view {m!r}: row {row}, {self._column_label(m, column)} is {x[row, column]:g}"
                    ", beyond float32 after standardising; rescale it"
                )
            features[m] = torch.from_numpy(z)
        n = next(iter(arrays.values())).shape[0]
        split = FeatureSplit(
            features,
            torch.zeros(n, dtype=torch.long),
            torch.arange(n),
            {m: torch.from_numpy(p) for m, p in present.items()},
        )
        device = next(self.model_.parameters()).device
        batch_size = self.config_.train.eval_batch_size
        cache = encode_split(self.model_, split, batch_size=batch_size, device=device)
        logits = predict_logits(self.model_, cache, **self.inference_, batch_size=batch_size)
        return torch.softmax(logits.double(), dim=1).cpu().numpy()

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row."""
        check_is_fitted(self, "model_")
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]
