"""The five extension points of equimodal, each a :class:`~equimodal.core.registry.Registry`.

=============  ==================================  ===================================
registry       holds                               plugin entry-point group
=============  ==================================  ===================================
STRATEGIES     Strategy subclasses (training       ``equimodal.strategies``
               methods), under their ``name``
DATASETS       ``DatasetEntry`` (info + loader)    ``equimodal.datasets``
PREPARERS      ``prepare(raw, out, progress, ...)``  ``equimodal.datasets`` (a dataset
               of a media dataset                  plugin registers both)
ENCODERS       ``EncoderKind`` (builder + options)  ``equimodal.encoders``
FUSIONS        ``Fusion`` subclasses                ``equimodal.fusions``
=============  ==================================  ===================================

The built-in modules are named here as strings and imported on first use, so this module
imports nothing of equimodal and any layer may read a registry.
"""

from __future__ import annotations

from typing import Any

from equimodal.core.registry import Registry

#: modules that register the built-in datasets (and the preparers of the media datasets)
DATASET_MODULES = (
    "equimodal.data.mfeat",
    "equimodal.data.htad",
    "equimodal.data.synthetic",
    "equimodal.data.features",
    "equimodal.data.cremad",
    "equimodal.data.kinetics_sounds",
    "equimodal.data.mvsa",
    "equimodal.data.iemocap",
)

STRATEGIES: Registry[Any] = Registry(
    "strategy", builtins=("equimodal.strategies",), group="equimodal.strategies"
)
DATASETS: Registry[Any] = Registry("dataset", builtins=DATASET_MODULES, group="equimodal.datasets")
PREPARERS: Registry[Any] = Registry(
    "preparer", builtins=DATASET_MODULES, group="equimodal.datasets", plugin_objects=False
)
ENCODERS: Registry[Any] = Registry(
    "encoder",
    builtins=(
        "equimodal.models.encoders",
        "equimodal.models.resnet",
        "equimodal.models.backbones",
        "equimodal.models.text",
        "equimodal.models.sequence",
    ),
    group="equimodal.encoders",
)
FUSIONS: Registry[Any] = Registry(
    "fusion",
    builtins=("equimodal.models.fusion", "equimodal.models.greedy_fusion"),
    group="equimodal.fusions",
)
