"""``decision_calibration``: joint training plus a calibrated decision layer (after
Ma et al., arXiv 2510.14411; the formula is ours).

Training is ``joint``. Each time the validation split is scored, per-modality
temperatures ``tau_m`` and per-class weights ``w_m(c)`` (positive, summing to ``M`` per
class) are fitted on it by minimising the NLL of ``sum_m w_m(c) z_m / tau_m``, ``z_m`` the
modality's own logits; prediction uses that calibrated sum. The test split never fits
anything: it reuses the calibration of the selected checkpoint's validation pass.
Needs a fusion with additive per-modality logits (concat, sum, late, shared).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from equimodal.balance.decision import Calibration, fit_calibration
from equimodal.strategies.base import register_strategy
from equimodal.strategies.joint import JointConfig, JointStrategy

if TYPE_CHECKING:
    from equimodal.engine.validation import FeatureCache


class DecisionCalibrationConfig(JointConfig):
    """Options of ``decision_calibration``."""

    name: Literal["decision_calibration"] = "decision_calibration"  # type: ignore[assignment]
    steps: int = Field(100, gt=0, description="L-BFGS iterations of the calibration fit")


@register_strategy
class DecisionCalibrationStrategy(JointStrategy):
    """Joint training whose decision layer is recalibrated on validation; see module doc."""

    name = "decision_calibration"
    config_class = DecisionCalibrationConfig
    default_fusion = "concat"
    fusions = ("concat", "sum", "late", "shared")
    config: DecisionCalibrationConfig

    def __init__(self, config: DecisionCalibrationConfig) -> None:
        super().__init__(config)
        self.calibration: Calibration | None = None

    def prepare_inference(self, cache: FeatureCache) -> None:
        import torch

        model = self.context.model
        with torch.no_grad():
            logits = model.unimodal_logits(cache.z)
        self.calibration = fit_calibration(logits, cache.labels, steps=self.config.steps)

    def inference_kwargs(self) -> dict[str, Any]:
        return {} if self.calibration is None else {"calibration": self.calibration}

    def epoch_log(self) -> dict[str, Any]:
        return {} if self.calibration is None else {"calibration": self.calibration.to_dict()}

    def state_dict(self) -> dict[str, Any]:
        return {"calibration": None if self.calibration is None else self.calibration.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("calibration")
        self.calibration = None if saved is None else Calibration.from_dict(saved)
