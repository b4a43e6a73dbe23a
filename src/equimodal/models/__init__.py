"""Encoders, fusions, the cross-modal memory and the model that composes them."""

from equimodal.models.fusion import FUSION_NAMES, FusionOutput, build_fusion
from equimodal.models.memory import CrossModalMemory
from equimodal.models.model import ModelOutput, MultimodalModel, induce_orders

__all__ = [
    "FUSION_NAMES",
    "CrossModalMemory",
    "FusionOutput",
    "ModelOutput",
    "MultimodalModel",
    "build_fusion",
    "induce_orders",
]
