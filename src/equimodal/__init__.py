"""equimodal: balanced multimodal learning.

Shapley-guided alternating training with cross-modal memory (arXiv 2506.00030), the
methods it is compared against, balance diagnostics (Shapley contributions, EDM) and an
honest benchmark protocol.

The Python API is imported on first use, so ``import equimodal`` stays light:
``equimodal.fit`` (train on your own data and modules), ``equimodal.make_data``,
``equimodal.load_run``, ``equimodal.evaluate``, ``equimodal.evaluate_robustness``,
``equimodal.diagnose`` and ``equimodal.EquimodalClassifier`` (a scikit-learn estimator).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "EquimodalClassifier",
    "__version__",
    "diagnose",
    "evaluate",
    "evaluate_robustness",
    "fit",
    "load_run",
    "make_data",
]

#: names this package exposes lazily: name -> the module that defines it
_LAZY = {
    "EquimodalClassifier": "equimodal.apps.estimator",
    "fit": "equimodal.apps.api",
    "make_data": "equimodal.data.custom",
    "load_run": "equimodal.engine.runs",
    "evaluate": "equimodal.evaluation.scores",
    "evaluate_robustness": "equimodal.evaluation.robustness",
    "diagnose": "equimodal.apps.diagnose",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        # a dynamic import: the lower layers import this package for __version__, and a
        # static import of the apps layer here would count as their dependency on it
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
