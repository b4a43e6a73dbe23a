"""``relearning``: diagnosing and re-learning (Wei, Li, Feng, Hu, *Diagnosing and
Re-learning for Balanced Multimodal Learning*, ECCV 2024; see docs/methods.md).

Source: the official code (github.com/GeWu-Lab/Diagnosing_Relearning_ECCV2024):
``code/ours.py`` (``purity_score``, ``reinit_score``, ``reinit``, ``get_feature`` and the
loop of ``main``; defaults in ``get_arguments`` and ``code/script/ours.sh``), and
BalanceBenchmark's port (github.com/GeWu-Lab/BalanceBenchmark,
``balancemm/trainer/ReLearning_trainer.py``), which is the same rule for any modalities.

Training is plain joint training (``CE`` of the fused logits). The initial weights of
every modality's encoder are kept from the start. After epoch ``k * reinit_epoch + 1``
(1-based; the official 0-based ``epoch % reinit_epoch == 0 and epoch > 0``) for
``k = 1 .. reinit_num``, after that epoch's validation:

1. **Diagnose.** For each modality ``m``, its features ``z_m`` (the head's input) of the
   whole training set and of the validation set, in evaluation mode with the current
   model, are each scaled column-wise to ``[-1, 1]`` (min-max over that set) and
   clustered by k-means with ``k`` = the number of classes; the *purity* ``P`` of a
   clustering is the fraction of samples whose label is the majority label of their
   cluster.
2. **Re-initialisation strength.** ``alpha_m = tanh(lambda * |P_train,m - P_val,m|)``: a
   modality whose training features separate the classes much better than its
   validation features has been learnt (or over-fitted) further and is re-initialised
   more.
3. **Soft re-initialisation.** Every parameter of ``m``'s encoder (and its projection to
   the common width) becomes ``alpha_m * theta_init + (1 - alpha_m) * theta``; heads,
   fusion and optimizer state are left as they are.

Defaults (official ``get_arguments`` / ``ours.sh``): ``move_lambda`` 3, ``reinit_epoch``
20, ``reinit_num`` 3 (BalanceBenchmark: 3, 15, 2).

Differences from the official code, and why:

- **k-means in torch.** sklearn's ``KMeans(n_clusters=C, random_state=0)`` is replaced by
  our own Lloyd k-means with greedy k-means++ seeding (``2 + log k`` candidates per
  centre, as sklearn), ``kmeans_restarts`` runs (10, sklearn's default before 1.4) of at
  most 300 iterations with sklearn's tolerance, the lowest inertia kept. It runs on the
  features' device (float32) with its draws from a CPU generator seeded with the run's
  seed (the official code uses the fixed ``random_state=0``), so the diagnosis is
  deterministic given the seed (on one device type) and does not depend on the installed
  sklearn version. Clusterings can differ from sklearn's where k-means has several local
  optima.
- **Training features.** The loop gives a strategy the training set only batch by batch,
  so in a diagnosis epoch the training batches' inputs are kept and, after the epoch,
  encoded again in evaluation mode with the final model: the official ``get_feature``
  pass over the training loader, without a second loader. The inputs are kept for that
  one epoch only (about one copy of the training inputs, on their device).
  Validation features are those the loop computed for validation (``prepare_inference``).
- **Features.** ``z_m``, the projected features the head reads (the official code
  clusters the encoders' pooled outputs, which are the head's input there). The
  re-initialised parameters are ``model.modality_parameters(m)``: the encoder and its
  projection (the official ``audio_net`` / ``visual_net`` parameters; buffers such as batch
  norm statistics are not touched, as there).
- **Rows missing a modality** (``missing_rate``, incomplete data) take no part in that
  modality's clustering. A modality with no rows in the training or validation set gets
  ``alpha = 0``; with fewer rows than classes, ``k`` is the number of rows.
- **Early stopping**: a re-initialisation starts the patience count anew
  (``restarts_patience``); the official loop has no early stopping.
- **State.** The initial weights are snapshot in ``setup`` (the loop builds the model from
  the seed before it) and kept, encoded exactly, in the strategy state until the last
  re-initialisation, up to ``STATE_WEIGHTS_LIMIT`` characters (beyond it a resumed run
  uses its own snapshot from ``setup``, the same initial weights when the run rebuilds
  its model from the same seed). ``--resume`` continues exactly.
- Model, optimizer and schedule are equimodal's (the run's config), not the official
  ResNet-18 encoders and SGD; the official loop selects its model on the test set,
  equimodal on validation.

Ours, beyond the official code: **any number of modalities** (each diagnosed and
re-initialised on its own, as in BalanceBenchmark's port), **any fusion** (the rule touches
only the encoders; the memory fusion adds its alignment loss as in ``joint``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from equimodal.data.batch import MultimodalBatch
from equimodal.strategies.base import (
    TrainContext,
    register_strategy,
)
from equimodal.strategies.joint import JointConfig, JointStrategy
from equimodal.strategies.udi import STATE_WEIGHTS_LIMIT, decode_tensor, encode_tensor

if TYPE_CHECKING:
    from equimodal.engine.validation import FeatureCache, SplitReport


class RelearningConfig(JointConfig):
    """Options of ``relearning``."""

    name: Literal["relearning"] = "relearning"  # type: ignore[assignment]
    move_lambda: float = Field(
        3.0, ge=0.0, description="lambda of alpha_m = tanh(lambda * |purity_train - purity_val|)"
    )
    reinit_epoch: int = Field(
        20,
        gt=0,
        description="re-initialise after epochs k * reinit_epoch + 1 (1-based), k = 1, 2, ...",
    )
    reinit_num: int = Field(3, ge=0, description="the most re-initialisations in a run")
    kmeans_restarts: int = Field(
        10, gt=0, description="k-means runs from different seedings; the lowest inertia wins"
    )
    kmeans_iterations: int = Field(300, gt=0, description="the most Lloyd iterations of a run")
    kmeans_tol: float = Field(
        1e-4,
        ge=0.0,
        description="k-means stops when the centres move less than tol * mean feature variance",
    )


# ---------------------------------------------------------------------------- diagnosis
def minmax_scale(x: torch.Tensor) -> torch.Tensor:
    """Each column mapped linearly to ``[-1, 1]`` (sklearn's ``MinMaxScaler((-1, 1))``; a
    constant column goes to ``-1``)."""
    low = x.min(0).values
    span = x.max(0).values - low
    span = torch.where(span == 0, torch.ones_like(span), span)
    return (x - low) / span * 2.0 - 1.0


def _sq_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    d = (x * x).sum(1, keepdim=True) - 2.0 * x @ centres.T + (centres * centres).sum(1)[None]
    return d.clamp_min(0.0)


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (sklearn's): each new centre is the best of
    ``2 + floor(log k)`` candidates drawn with probability proportional to ``D^2``."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    closest = _sq_distances(x, x[first : first + 1]).squeeze(1)
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0:  # every point sits on a centre: any point will do
            idx = torch.randint(n, (trials,), generator=generator)
        else:  # drawn on the CPU, where the generator lives
            weights = (closest / total).to("cpu", torch.float64)
            idx = torch.multinomial(weights, trials, replacement=True, generator=generator)
        idx = idx.to(x.device)
        cand = _sq_distances(x, x[idx])  # (n, trials)
        pots = torch.minimum(closest[:, None], cand).sum(0)
        best = int(pots.argmin())
        centres.append(x[idx[best]])
        closest = torch.minimum(closest, cand[:, best])
    return torch.stack(centres)


def kmeans(
    x: torch.Tensor,
    k: int,
    generator: torch.Generator,
    restarts: int = 10,
    iterations: int = 300,
    tol: float = 1e-4,
) -> torch.Tensor:
    """Cluster ids ``(n,)`` of Lloyd's k-means with greedy k-means++ seeding, on ``x``'s
    device (float32, or float64 when given); the seeding draws come from ``generator``
    (a CPU generator). Of ``restarts`` runs the lowest inertia wins (the first on ties).
    An empty cluster's centre moves to the point farthest from its own centre."""
    x = x.detach()
    if x.dtype != torch.float64:
        x = x.float()
    n = x.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    k = max(1, min(k, n))
    threshold = tol * float(x.var(0, unbiased=False).mean()) if n > 1 else 0.0
    best_labels, best_inertia = None, math.inf
    for _ in range(restarts):
        centres = _kmeans_plus_plus(x, k, generator)
        for _ in range(iterations):
            d = _sq_distances(x, centres)
            near, labels = d.min(1)
            counts = torch.bincount(labels, minlength=k)
            sums = torch.zeros_like(centres).index_add_(0, labels, x)
            new = sums / counts.clamp_min(1)[:, None].to(x.dtype)
            empty = (counts == 0).nonzero().squeeze(1).tolist() if k > 1 else []
            if empty:
                far = near.argsort(descending=True, stable=True)
                for j, c in enumerate(empty):
                    new[c] = x[far[j]]
            shift = float(((new - centres) ** 2).sum())
            centres = new
            if shift <= threshold:
                break
        near, labels = _sq_distances(x, centres).min(1)
        inertia = float(near.sum())
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    assert best_labels is not None
    return best_labels


def purity(labels: torch.Tensor, clusters: torch.Tensor) -> float:
    """Fraction of samples whose label is the most frequent label of their cluster."""
    labels = labels.detach().cpu().long()
    clusters = clusters.detach().cpu().long()
    if labels.numel() == 0:
        return math.nan
    hits = 0
    for c in clusters.unique():
        hits += int(torch.bincount(labels[clusters == c]).max())
    return hits / labels.numel()


def cluster_purity(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    seed: int,
    restarts: int = 10,
    iterations: int = 300,
    tol: float = 1e-4,
) -> float:
    """The official diagnosis of one feature set: min-max scaling to ``[-1, 1]``, k-means
    with ``k = num_classes`` (seeded with ``seed``), purity against ``labels`` (NaN for
    an empty set)."""
    if features.shape[0] == 0:
        return math.nan
    scaled = minmax_scale(features.detach())
    generator = torch.Generator().manual_seed(seed)
    clusters = kmeans(scaled, num_classes, generator, restarts, iterations, tol)
    return purity(labels, clusters)


def reinit_strength(train_purity: float, val_purity: float, move_lambda: float) -> float:
    """``alpha = tanh(lambda * |P_train - P_val|)``; 0 when either purity is unknown."""
    if math.isnan(train_purity) or math.isnan(val_purity):
        return 0.0
    return math.tanh(move_lambda * abs(train_purity - val_purity))


def soft_reinit(current: torch.Tensor, initial: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * initial + (1 - alpha) * current`` (the official ``reinit``)."""
    return alpha * initial + (1.0 - alpha) * current


# ---------------------------------------------------------------------------- strategy
@register_strategy
class RelearningStrategy(JointStrategy):
    """Joint training with periodic diagnosis and soft re-initialisation; see module doc."""

    name = "relearning"
    config_class = RelearningConfig
    default_fusion = "concat"
    fusions = None
    supports_distributed = False  # the diagnosis clusters one process's features
    config: RelearningConfig  # type: ignore[assignment]

    def __init__(self, config: RelearningConfig) -> None:
        super().__init__(config)
        #: per modality, the initial weights of ``model.modality_parameters(m)``
        self.initial: dict[str, list[torch.Tensor]] = {}
        self._initial_encoded: dict[str, list[dict[str, Any]]] | None = None
        #: the last epoch that ended (its re-initialisation, if any, done)
        self.epoch = 0
        self.reinits = 0
        #: the latest diagnosis: purities and strengths per modality
        self.diagnosis: dict[str, dict[str, float | None]] = {}
        self._collecting = False
        self._kept: list[MultimodalBatch] = []
        self._val: FeatureCache | None = None
        self._reinitialised_now = False

    # ------------------------------------------------------------------ set-up
    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self.initial = {
            m: [p.detach().clone() for p in ctx.model.modality_parameters(m)]
            for m in ctx.modalities
        }
        self._initial_encoded = None

    # ------------------------------------------------------------------ schedule
    def is_reinit_epoch(self, epoch: int) -> bool:
        """Whether the end of ``epoch`` (1-based) re-initialises: ``epoch - 1`` is
        ``k * reinit_epoch`` with ``1 <= k <= reinit_num``."""
        r = self.config.reinit_epoch
        k, rest = divmod(epoch - 1, r)
        return rest == 0 and 1 <= k <= self.config.reinit_num

    @property
    def finished(self) -> bool:
        """True once the last re-initialisation of the run is behind."""
        return self.epoch >= self.config.reinit_num * self.config.reinit_epoch + 1

    def on_epoch_start(self, epoch: int) -> None:
        self._collecting = self.is_reinit_epoch(epoch)
        self._kept = []
        self._reinitialised_now = False

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        if self._collecting:
            self._kept.append(
                MultimodalBatch(
                    inputs={m: x.detach() for m, x in batch.inputs.items()},
                    present=dict(batch.present),
                    labels=batch.labels,
                    indices=batch.indices,
                )
            )
        return super().training_step(batch)  # the official step is joint training

    def prepare_inference(self, cache: FeatureCache) -> None:
        self._val = cache  # the diagnosis clusters these validation features

    def on_epoch_end(self, epoch: int, report: SplitReport) -> None:
        self.epoch = epoch
        if not self.is_reinit_epoch(epoch):
            return
        if self._val is None:
            raise RuntimeError(
                "strategy relearning: no validation features to diagnose; the loop passes "
                "them to prepare_inference before on_epoch_end"
            )
        train_z, train_y = self.training_features()
        val_z = self._val.z
        val_y = self._val.labels
        val_present = self._val.present
        val = {m: (val_z[m][val_present[m]], val_y[val_present[m]]) for m in val_z}
        alphas = self.diagnose(train_z, train_y, val)
        self.reinitialise(alphas)
        self.reinits += 1
        self._kept = []
        self._collecting = False
        self._reinitialised_now = True
        if self.finished:
            self._initial_encoded = None

    # ------------------------------------------------------------------ the rule
    @torch.no_grad()
    def training_features(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The kept training batches encoded in evaluation mode with the current model:
        per modality the features and labels of the rows that have it."""
        model = self.context.model
        was_training = model.training
        model.eval()
        feats: dict[str, list[torch.Tensor]] = {m: [] for m in self.context.modalities}
        labels: dict[str, list[torch.Tensor]] = {m: [] for m in self.context.modalities}
        try:
            for batch in self._kept:
                for m in self.context.modalities:
                    rows = batch.present[m]
                    if not bool(rows.any()):
                        continue
                    z = model.encode_modality(m, batch.inputs[m])
                    feats[m].append(z[rows])
                    labels[m].append(batch.labels[rows])
        finally:
            model.train(was_training)
        dim = model.dim
        out_z = {
            m: torch.cat(v) if v else torch.zeros(0, dim, device="cpu") for m, v in feats.items()
        }
        out_y = {
            m: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for m, v in labels.items()
        }
        return out_z, out_y

    def diagnose(
        self,
        train_z: dict[str, torch.Tensor],
        train_y: dict[str, torch.Tensor],
        val: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> dict[str, float]:
        """Purity of each modality's training and validation features and its
        re-initialisation strength ``alpha_m`` (kept in :attr:`diagnosis`)."""
        cfg, ctx = self.config, self.context

        def score(z: torch.Tensor, y: torch.Tensor) -> float:
            return cluster_purity(
                z,
                y,
                ctx.num_classes,
                ctx.seed,
                restarts=cfg.kmeans_restarts,
                iterations=cfg.kmeans_iterations,
                tol=cfg.kmeans_tol,
            )

        alphas: dict[str, float] = {}
        self.diagnosis = {}
        for m in ctx.modalities:
            p_train = score(train_z[m], train_y[m])
            p_val = score(*val[m])
            alphas[m] = reinit_strength(p_train, p_val, cfg.move_lambda)
            self.diagnosis[m] = {
                "purity_train": None if math.isnan(p_train) else p_train,
                "purity_val": None if math.isnan(p_val) else p_val,
                "alpha": alphas[m],
            }
        return alphas

    @torch.no_grad()
    def reinitialise(self, alphas: dict[str, float]) -> None:
        """``theta <- alpha_m theta_init + (1 - alpha_m) theta`` for every parameter of
        each modality's encoder and projection."""
        model = self.context.model
        for m, alpha in alphas.items():
            if alpha == 0.0:
                continue
            params = model.modality_parameters(m)
            initial = self.initial[m]
            if len(params) != len(initial):
                raise ValueError(
                    f"strategy relearning: {len(initial)} initial tensors of {m!r}, "
                    f"the model has {len(params)}"
                )
            for p, p0 in zip(params, initial, strict=True):
                p.copy_(soft_reinit(p, p0.to(device=p.device, dtype=p.dtype), alpha))

    # ------------------------------------------------------------------ loop
    def restarts_patience(self) -> bool:
        return self._reinitialised_now

    def epoch_log(self) -> dict[str, Any]:
        if not self._reinitialised_now:
            return {}
        return {
            "reinit": self.reinits,
            "diagnosis": {m: dict(d) for m, d in self.diagnosis.items()},
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "reinits": self.reinits,
            "diagnosis": {m: dict(d) for m, d in self.diagnosis.items()},
        }
        if not self.finished and self.initial:
            if self._initial_encoded is None:
                self._initial_encoded = {
                    m: [encode_tensor(t) for t in tensors] for m, tensors in self.initial.items()
                }
            size = sum(len(t["data"]) for ts in self._initial_encoded.values() for t in ts)
            if size <= STATE_WEIGHTS_LIMIT:  # never changed in place: shared as it is
                state["initial"] = self._initial_encoded
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.reinits = int(state.get("reinits", 0))
        self.diagnosis = {m: dict(d) for m, d in (state.get("diagnosis") or {}).items()}
        encoded = state.get("initial")
        if encoded:
            initial = {m: [decode_tensor(t) for t in ts] for m, ts in encoded.items()}
            for m, tensors in initial.items():
                known = self.initial.get(m)
                if known is not None:
                    shapes = [tuple(t.shape) for t in known]
                    if shapes != [tuple(t.shape) for t in tensors]:
                        raise ValueError(
                            f"strategy relearning: the saved initial weights of {m!r} do not "
                            "fit the model"
                        )
                    tensors = [t.to(k.device) for t, k in zip(tensors, known, strict=True)]
                initial[m] = tensors
            self.initial = initial
            self._initial_encoded = encoded
