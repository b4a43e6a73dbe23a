"""Training methods, each a Strategy with hooks on the one training loop.

Importing this package registers the built-in methods in
:data:`equimodal.core.registries.STRATEGIES`; plugins register through the
``equimodal.strategies`` entry-point group.
"""

from __future__ import annotations

from equimodal.engine.strategy import (
    Strategy,
    TrainContext,
    build_strategy,
    get_strategy_class,
    register_strategy,
    strategy_names,
)
from equimodal.strategies import (  # noqa: F401  (importing registers them)
    agm,
    amco,
    cml,
    decision_calibration,
    gblending,
    greedy,
    joint,
    lfm,
    mbsd,
    mla,
    mmcosine,
    mmpareto,
    ogm_ge,
    opm,
    pmr,
    reconboost,
    relearning,
    shapley_alternating,
    udi,
    umt,
    unimodal,
    valuation,
)

__all__ = [
    "Strategy",
    "TrainContext",
    "build_strategy",
    "get_strategy_class",
    "register_strategy",
    "strategy_names",
]
