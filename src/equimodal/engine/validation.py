"""Scoring a model on a split: accuracy, macro-F1, loss, Shapley values and EDM.

Encoders run once per sample (``encode_split``); every coalition of modalities is then
scored from the cached features, running only the fusion and the head.
The coalitions a Shapley estimate needs are known in advance and scored together
(:func:`predict_coalition_logits`): the memory fusion runs each distinct prefix of every
(coalition, order) once, in one batched pass per chain position.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from equimodal.balance.edm import EDMResult, edm
from equimodal.balance.orders import all_orders
from equimodal.balance.shapley import ShapleyResult, required_coalitions, shapley_values
from equimodal.data.base import FeatureSplit
from equimodal.models.model import MultimodalModel

VALUE_KINDS = ("accuracy", "neg_loss", "true_class_prob")


@dataclass
class FeatureCache:
    """Projected features ``z_m`` of a whole split, with present masks and labels."""

    z: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@torch.no_grad()
def encode_split(
    model: MultimodalModel,
    split: FeatureSplit,
    batch_size: int = 2048,
    device: torch.device | str = "cpu",
) -> FeatureCache:
    """Run every encoder once over ``split`` (eval mode) and keep the features."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {m: [] for m in model.modalities}
    for batch in split.batches(batch_size):
        batch = batch.to(device)
        for m, z in model.encode(batch).items():
            parts[m].append(z)
    model.train(was_training)
    z = {m: torch.cat(v) for m, v in parts.items()}
    present = {m: split.present[m].to(device) for m in model.modalities}
    return FeatureCache(z=z, present=present, labels=split.labels.to(device))


@torch.no_grad()
def predict_logits(
    model: MultimodalModel,
    cache: FeatureCache,
    modalities: Sequence[str] | None = None,
    orders: Sequence[Sequence[str]] | None = None,
    weights: Sequence[float] | None = None,
    batch_size: int = 4096,
    **fuse_options: Any,
) -> torch.Tensor:
    """Logits of the model reading only ``modalities`` from cached features (eval mode).

    ``fuse_options`` go to ``model.fuse`` (e.g. a strategy's ``calibration``).
    """
    was_training = model.training
    model.eval()
    n = len(cache)
    out = []
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        z = {m: v[rows] for m, v in cache.z.items()}
        p = {m: v[rows] for m, v in cache.present.items()}
        out.append(
            model.fuse(
                z, p, modalities=modalities, orders=orders, weights=weights, **fuse_options
            ).logits
        )
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def predict_coalition_logits(
    model: MultimodalModel,
    cache: FeatureCache,
    coalitions: Sequence[Sequence[str]],
    orders: Sequence[Sequence[str]] | None = None,
    weights: Sequence[float] | None = None,
    batch_size: int = 4096,
    **fuse_options: Any,
) -> list[torch.Tensor]:
    """Logits of the model reading each coalition, from cached features (eval mode).

    Equals :func:`predict_logits` per coalition; the memory fusion evaluates all
    coalitions and orders in one batched computation over shared prefixes
    (:meth:`MultimodalModel.fuse_coalitions`).
    """
    was_training = model.training
    model.eval()
    try:
        return model.fuse_coalitions(
            cache.z,
            cache.present,
            coalitions,
            orders=orders,
            weights=weights,
            max_rows=batch_size,
            **fuse_options,
        )
    finally:
        model.train(was_training)


def value_of_logits(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> float:
    """The coalition value of predictions: accuracy, negative CE, or mean true-class probability."""
    if kind == "accuracy":
        return float((logits.argmax(1) == labels).float().mean())
    if kind == "neg_loss":
        return -float(F.cross_entropy(logits, labels))
    if kind == "true_class_prob":
        return float(torch.softmax(logits, 1).gather(1, labels[:, None]).mean())
    raise ValueError(f"unknown value {kind!r}; choose one of {', '.join(VALUE_KINDS)}")


def value_of_prior(prior: torch.Tensor, labels: torch.Tensor, kind: str) -> float:
    """v(empty): the value of predicting from the training class prior alone."""
    prior = prior.to(labels.device)
    if kind == "accuracy":
        return float((labels == int(prior.argmax())).float().mean())
    if kind == "neg_loss":
        return float(torch.log(prior.clamp_min(1e-12))[labels].mean())
    if kind == "true_class_prob":
        return float(prior[labels].mean())
    raise ValueError(f"unknown value {kind!r}; choose one of {', '.join(VALUE_KINDS)}")


@dataclass
class SplitReport:
    """The scores of one model on one split."""

    split: str
    modalities: tuple[str, ...]
    num_samples: int
    accuracy: float
    macro_f1: float
    loss: float
    shapley: ShapleyResult | None = None
    schedule_shapley: ShapleyResult | None = None
    edm: EDMResult | None = None
    value_kind: str = "accuracy"
    #: the all-orders accuracy next to the order set's (:func:`order_set_gap`)
    order_gap: dict[str, Any] | None = None
    #: ``inference``: coalitions scored as the model predicts; ``custom``: with other
    #: fuse arguments (``evaluate_cache(shapley_inference=...)``)
    shapley_orders: str = "inference"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (Shapley of accuracy per modality, shares, EDM)."""
        out: dict[str, Any] = {
            "num_samples": self.num_samples,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "loss": self.loss,
        }
        if self.shapley is not None:
            names = self.modalities
            out["shapley"] = dict(zip(names, map(float, self.shapley.values), strict=True))
            if self.shapley.stderr is not None:
                out["shapley_stderr"] = dict(
                    zip(names, map(float, self.shapley.stderr), strict=True)
                )
            out["shapley_share"] = dict(zip(names, map(float, self.shapley.shares()), strict=True))
            out["v_all"] = self.shapley.v_all
            out["v_empty"] = self.shapley.v_empty
            if self.shapley_orders != "inference":
                out["shapley_orders"] = self.shapley_orders
        if self.schedule_shapley is not None and self.value_kind != "accuracy":
            out[f"shapley_{self.value_kind}"] = dict(
                zip(self.modalities, map(float, self.schedule_shapley.values), strict=True)
            )
        if self.edm is not None:
            out["edm"] = self.edm.edm
            out["edm_deviation"] = dict(
                zip(self.modalities, map(float, self.edm.deviations), strict=True)
            )
        if self.order_gap is not None:
            out.update(self.order_gap)
        return out


def order_set_gap(
    model: MultimodalModel,
    cache: FeatureCache,
    inference: Mapping[str, Any],
    max_orders: int = 720,
    batch_size: int = 4096,
) -> dict[str, Any] | None:
    """How far an order set (hybrid-order inference) is from the average over all orders.

    For a model whose fusion reads modalities in an order, with an inference that averages
    over ``orders`` and ``M! <= max_orders``: ``all_orders_accuracy`` (the prediction
    averaged over all ``M!`` orders) and ``orders_used`` (how many orders the inference
    averages), to set beside the split's ``accuracy``. None otherwise.
    """
    orders = inference.get("orders")
    names = model.modalities
    if not model.uses_order or not orders or math.factorial(len(names)) > max_orders:
        return None
    every = [tuple(names[i] for i in order) for order in all_orders(len(names))]
    rest = {k: v for k, v in inference.items() if k not in ("orders", "weights")}
    logits = predict_logits(model, cache, orders=every, batch_size=batch_size, **rest)
    accuracy = float((logits.argmax(1) == cache.labels).float().mean())
    return {"all_orders_accuracy": accuracy, "orders_used": len(orders)}


def evaluate_cache(
    model: MultimodalModel,
    cache: FeatureCache,
    split: str,
    prior: torch.Tensor,
    inference: Mapping[str, Any] | None = None,
    shapley: bool = True,
    value_kind: str = "accuracy",
    max_exact: int = 8,
    permutations: int = 64,
    seed: int = 0,
    batch_size: int = 4096,
    modalities: Sequence[str] | None = None,
    shapley_inference: Mapping[str, Any] | None = None,
) -> SplitReport:
    """Score cached features: metrics, Shapley values and EDM.

    ``shapley_inference`` (None: ``inference``) are the ``model.fuse`` arguments every
    coalition is scored with for the Shapley values and EDM, e.g. one modality order
    where ``inference`` averages over many (a cheaper estimate for scheduling; the report
    says ``shapley_orders: custom``).

    ``inference`` holds the strategy's ``model.fuse`` arguments (e.g. hybrid orders);
    ``prior`` the training class frequencies, which give v(empty). ``modalities`` limits
    the model to a subset (all by default); Shapley values are over the modalities read,
    and need at least two of them.
    """
    inference = dict(inference or {})
    names = tuple(modalities) if modalities is not None else model.modalities
    # a strategy may restrict what its model reads (e.g. unimodal); the players stay all
    # modalities, and those it cannot read contribute nothing
    readable = inference.pop("modalities", None)

    def read(members: Sequence[str]) -> list[str]:
        return [m for m in members if readable is None or m in readable]

    if not read(names):
        raise ValueError(f"the model reads none of the modalities {', '.join(names)}")
    logits = predict_logits(
        model, cache, modalities=read(names), **inference, batch_size=batch_size
    )
    labels = cache.labels
    accuracy = value_of_logits(logits, labels, "accuracy")
    loss = float(F.cross_entropy(logits, labels))
    macro_f1 = float(
        f1_score(
            labels.cpu().numpy(), logits.argmax(1).cpu().numpy(), average="macro", zero_division=0
        )
    )
    report = SplitReport(
        split=split,
        modalities=names,
        num_samples=len(cache),
        accuracy=accuracy,
        macro_f1=macro_f1,
        loss=loss,
        value_kind=value_kind,
    )
    if not shapley or len(names) < 2:
        return report
    logits_of: dict[tuple[str, ...], torch.Tensor] = {}
    if shapley_inference is None:
        logits_of[tuple(read(names))] = logits
    else:
        inference = {k: v for k, v in shapley_inference.items() if k != "modalities"}
        report.shapley_orders = "custom"

    def coalition_logits(mask: int) -> torch.Tensor | None:
        members = tuple(read([names[i] for i in range(len(names)) if mask >> i & 1]))
        if not members:
            return None
        if members not in logits_of:
            logits_of[members] = predict_logits(
                model, cache, modalities=members, **inference, batch_size=batch_size
            )
        return logits_of[members]

    def value_fn(kind: str):
        def v(mask: int) -> float:
            coalition = coalition_logits(mask)
            if coalition is None:
                return value_of_prior(prior, labels, kind)
            return value_of_logits(coalition, labels, kind)

        return v

    options = {"max_exact_players": max_exact, "num_permutations": permutations, "seed": seed}
    # every coalition the estimate will ask for, evaluated in one batch
    wanted = {
        members
        for mask in required_coalitions(len(names), **options)
        for members in [tuple(read([names[i] for i in range(len(names)) if mask >> i & 1]))]
        if members and members not in logits_of
    }
    batch = sorted(wanted, key=lambda c: (len(c), [names.index(m) for m in c]))
    for members, out in zip(
        batch,
        predict_coalition_logits(model, cache, batch, **inference, batch_size=batch_size),
        strict=True,
    ):
        logits_of[members] = out
    report.shapley = shapley_values(value_fn("accuracy"), len(names), **options)
    report.schedule_shapley = (
        report.shapley
        if value_kind == "accuracy"
        else shapley_values(value_fn(value_kind), len(names), **options)
    )
    report.edm = edm(report.shapley.values)
    return report


def class_prior(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class frequencies of ``labels`` (the training split's prior)."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes).double()
    return (counts / counts.sum()).float()
