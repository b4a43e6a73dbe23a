"""Training methods, each a Strategy with hooks on the one training loop."""

from __future__ import annotations

from equimodal.strategies.base import Strategy, TrainContext

_STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Register a Strategy subclass under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _STRATEGIES[cls.name] = cls
    return cls


def _load_builtin() -> None:
    if _STRATEGIES:
        return
    from equimodal.strategies.agm import AGMStrategy
    from equimodal.strategies.decision_calibration import DecisionCalibrationStrategy
    from equimodal.strategies.joint import JointStrategy
    from equimodal.strategies.mla import MLAStrategy
    from equimodal.strategies.ogm_ge import OGMGEStrategy
    from equimodal.strategies.shapley_alternating import ShapleyAlternatingStrategy
    from equimodal.strategies.udi import UDIStrategy
    from equimodal.strategies.unimodal import UnimodalStrategy

    for cls in (
        AGMStrategy,
        DecisionCalibrationStrategy,
        JointStrategy,
        MLAStrategy,
        OGMGEStrategy,
        ShapleyAlternatingStrategy,
        UDIStrategy,
        UnimodalStrategy,
    ):
        register_strategy(cls)


def strategy_names() -> list[str]:
    """Names of all registered strategies."""
    _load_builtin()
    return sorted(_STRATEGIES)


def get_strategy_class(name: str) -> type[Strategy]:
    """The Strategy class registered as ``name``; KeyError with the closest name otherwise."""
    _load_builtin()
    if name not in _STRATEGIES:
        from equimodal.data.registry import closest_name

        raise KeyError(f"unknown strategy {name!r}; {closest_name(name, list(_STRATEGIES))}")
    return _STRATEGIES[name]


def build_strategy(config) -> Strategy:
    """Instantiate the strategy named by ``config.name`` with its validated options."""
    return get_strategy_class(config.name)(config)


__all__ = [
    "Strategy",
    "TrainContext",
    "build_strategy",
    "get_strategy_class",
    "register_strategy",
    "strategy_names",
]
