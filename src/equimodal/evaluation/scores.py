"""Scoring a trained model on a split from Python: accuracy, macro-F1, Shapley values, EDM.

The same scores the training loop reports, for a model you hold (``TrainResult.model``,
or one rebuilt by :func:`~equimodal.engine.runs.load_run`) and data you pass directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from equimodal.data.base import MultimodalData
from equimodal.data.custom import as_split
from equimodal.engine.validation import class_prior, encode_split, evaluate_cache
from equimodal.models.model import MultimodalModel


def check_modalities(model: MultimodalModel, modalities: Sequence[str]) -> None:
    """ValueError unless ``modalities`` is a non-empty list of the model's modalities."""
    names = list(model.modalities)
    bad = [m for m in modalities if m not in names]
    if bad:
        raise ValueError(f"unknown modality {bad[0]!r}; the model has {', '.join(names)}")
    if not modalities:
        raise ValueError("modalities is empty")


def evaluate(
    model: MultimodalModel,
    data: MultimodalData,
    strategy: Any = None,
    *,
    split: str | Any = "test",
    modalities: Sequence[str] | None = None,
    seed: int = 0,
    permutations: int = 64,
    max_exact: int = 8,
) -> dict[str, Any]:
    """Score ``model`` on a split of ``data``: a dict with ``accuracy``, ``macro_f1``,
    ``loss``, ``shapley`` (per modality, accuracy as the coalition value), ``shapley_share``
    and ``edm``.

    ``strategy`` (the trained one, ``TrainResult.strategy``) sets how the model predicts,
    e.g. over several modality orders; None uses the model's defaults. ``split`` is a split
    name of ``data`` or a split of your own (tensors, a dataset or a DataLoader, as
    :func:`equimodal.data.custom.as_split` takes); the empty coalition's value comes from
    the class frequencies of ``data.train``. ``modalities`` reads only those (the others
    count as missing). Runs on the model's device.
    """
    if modalities is not None:
        check_modalities(model, modalities)
    target = data.split(split) if isinstance(split, str) else as_split(split, "split")
    if len(target) == 0:
        raise ValueError(f"the {split if isinstance(split, str) else 'given'} split is empty")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        cache = encode_split(model, target, device=device)
        prior = class_prior(data.train.labels, data.num_classes).to(device)
        report = evaluate_cache(
            model,
            cache,
            split if isinstance(split, str) else "split",
            prior,
            inference=strategy.inference_kwargs() if strategy is not None else None,
            modalities=modalities,
            max_exact=max_exact,
            permutations=permutations,
            seed=seed,
        )
    finally:
        model.train(was_training)
    return report.to_dict()
