"""AGM's competition strength of a trained run (Li et al., ICCV 2023).

Trains one ``unimodal`` model per modality with the run's settings (the modality's
*concept*), maps the run's fused features to each concept with the ridge regression of
:func:`equimodal.balance.competition.competition_strength` fitted on validation, and scores
the map on test.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from equimodal.analysis.standalone import unimodal_config
from equimodal.balance.competition import competition_strength
from equimodal.config import RunConfig
from equimodal.data.base import MultimodalData
from equimodal.engine.trainer import Trainer
from equimodal.engine.validation import encode_split
from equimodal.models.model import MultimodalModel


def fused_features(model: MultimodalModel, cache: Any, inference: Mapping[str, Any]) -> np.ndarray:
    """The fusion's representation ``Z`` of every sample (the input of the head)."""
    model.eval()
    with torch.no_grad():
        out = model.fuse(cache.z, cache.present, **dict(inference))
    return out.fused.cpu().numpy()


def measure_competition(
    config: RunConfig,
    model: MultimodalModel,
    inference: Mapping[str, Any],
    data: MultimodalData,
    progress: bool = False,
) -> dict[str, float]:
    """Competition strength of every modality of a trained run.

    Trains one ``unimodal`` model per modality with the run's settings (its concept),
    fits the ridge maps on validation and scores them on test.
    """
    z_val = fused_features(model, encode_split(model, data.val), inference)
    z_test = fused_features(model, encode_split(model, data.test), inference)
    strength = {}
    for m in data.modalities:
        unimodal = Trainer(unimodal_config(config, m), data=data, progress=progress).fit().model
        u_val = encode_split(unimodal, data.val).z[m].cpu().numpy()
        u_test = encode_split(unimodal, data.test).z[m].cpu().numpy()
        strength[m] = competition_strength(z_val, u_val, z_test, u_test)
    return strength
