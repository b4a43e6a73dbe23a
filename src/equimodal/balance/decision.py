"""Decision-layer diagnostics and calibration (after Ma et al., arXiv 2510.14411).

Seed 004 finds modality imbalance in the decision layer itself (feature norms, decision
weight norms) and recommends adaptive weight allocation there, without a formula.

* :func:`decision_diagnostics`: per modality, mean feature norm, decision weight norm
  (Frobenius and per class), mean logit norm, share of the true-class logit and per-class
  accuracy of the modality's own logits.
* :func:`fit_calibration` (our choice): per-modality temperatures ``tau_m`` and per-class
  weights ``w_m(c)`` (positive, summing to ``M`` per class) that minimise the NLL of
  ``sum_m w_m(c) z_m / tau_m`` on the validation split; :func:`apply_calibration` uses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class Calibration:
    """Temperatures ``(M,)`` and per-class weights ``(M, C)`` in the order of ``modalities``."""

    modalities: tuple[str, ...]
    temperature: torch.Tensor
    weight: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "modalities": list(self.modalities),
            "temperature": self.temperature.tolist(),
            "weight": self.weight.tolist(),
        }

    def __call__(
        self, logits: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """The calibrated logits (:func:`apply_calibration`); a model's ``fuse`` calls this."""
        return apply_calibration(logits, present, self)

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tuple(state["modalities"]),
            torch.tensor(state["temperature"]),
            torch.tensor(state["weight"]),
        )


def apply_calibration(
    logits: Mapping[str, torch.Tensor],
    present: Mapping[str, torch.Tensor],
    calibration: Calibration,
) -> torch.Tensor:
    """``sum_m w_m(c) z_m / tau_m`` over the modalities in ``logits`` present per sample."""
    total = None
    for k, m in enumerate(calibration.modalities):
        if m not in logits:
            continue
        z = logits[m]
        term = z * calibration.weight[k].to(z) / calibration.temperature[k].to(z)
        term = term * present[m].unsqueeze(1).to(z.dtype)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("calibration shares no modality with the logits")
    return total


def fit_calibration(
    logits: Mapping[str, torch.Tensor], labels: torch.Tensor, steps: int = 100
) -> Calibration:
    """Fit temperatures and per-class weights by minimising the NLL (L-BFGS)."""
    names = tuple(logits)
    stacked = torch.stack([logits[m].detach().float() for m in names])  # (M, N, C)
    m, _, c = stacked.shape
    log_tau = torch.zeros(m, requires_grad=True)
    raw_weight = torch.zeros(m, c, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_tau, raw_weight], lr=0.5, max_iter=steps)

    def weights() -> torch.Tensor:
        return m * torch.softmax(raw_weight, dim=0)  # positive, sum to M per class

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        fused = (weights()[:, None, :] * stacked / log_tau.exp()[:, None, None]).sum(0)
        loss = F.cross_entropy(fused, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return Calibration(names, log_tau.detach().exp(), weights().detach())


def decision_diagnostics(
    features: Mapping[str, torch.Tensor],
    logits: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    present: Mapping[str, torch.Tensor],
) -> dict[str, dict[str, Any]]:
    """Decision-layer diagnostics per modality from its features ``z_m``, its own logits,
    the ``(C, d)`` decision weight that maps ``z_m`` to them, the labels and presence masks.

    (A model gives them as ``model.unimodal_logits(z)`` and ``model.decision_weights()``.)
    """
    with torch.no_grad():
        names = list(logits)
        true = {m: logits[m].gather(1, labels[:, None]).squeeze(1) for m in names}
        total_true = sum(t.abs() for t in true.values()) + 1e-12
        out: dict[str, dict[str, Any]] = {}
        for m in names:
            rows = present[m]
            z, logit = features[m][rows], logits[m][rows]
            y = labels[rows]
            pred = logit.argmax(1)
            per_class = {}
            for cls in range(logit.shape[1]):
                sel = y == cls
                per_class[cls] = (
                    float((pred[sel] == cls).float().mean()) if bool(sel.any()) else None
                )
            out[m] = {
                "feature_norm": float(z.norm(dim=1).mean()),
                "weight_norm": float(weights[m].norm()),
                "weight_norm_per_class": weights[m].norm(dim=1).tolist(),
                "logit_norm": float(logit.norm(dim=1).mean()),
                "true_logit_share": float((true[m].abs() / total_true)[rows].mean()),
                "accuracy": float((pred == y).float().mean()),
                "accuracy_per_class": per_class,
            }
    return out
