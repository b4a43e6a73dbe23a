"""Scoring a trained model beyond the loop's validation pass: robustness to missing
modalities and noise, and re-exports of the per-split scoring (every coalition's accuracy,
Shapley values, EDM) that the training loop itself uses."""

from equimodal.engine.validation import (
    FeatureCache,
    SplitReport,
    class_prior,
    encode_split,
    evaluate_cache,
    predict_coalition_logits,
    predict_logits,
)
from equimodal.evaluation.robustness import RobustnessResult, evaluate_robustness
from equimodal.evaluation.scores import evaluate

__all__ = [
    "FeatureCache",
    "RobustnessResult",
    "SplitReport",
    "class_prior",
    "encode_split",
    "evaluate",
    "evaluate_cache",
    "evaluate_robustness",
    "predict_coalition_logits",
    "predict_logits",
]
