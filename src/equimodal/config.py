"""Run configuration: pydantic models, YAML in and out, one-line errors.

Every section forbids unknown keys; an error names the key path and the closest valid
name. Strategy options live in the ``strategy`` section next to its ``name`` and are
validated by the options model that the strategy registers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from equimodal.core.registries import ENCODERS, FUSIONS, STRATEGIES
from equimodal.core.validation import format_validation_error


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line and says what to fix."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(Section):
    """Which dataset to load and the options of its loader."""

    name: str = "mfeat"
    options: dict[str, Any] = Field(default_factory=dict)


class EncoderConfig(Section):
    """An encoder: ``kind`` plus that kind's options (``equimodal encoders`` lists them).

    For ``mlp``: hidden width, depth, dropout, activation. The options are validated by the
    options model the encoder kind registers.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    kind: str = "mlp"

    @model_validator(mode="before")
    @classmethod
    def _check_options(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        kind = value.get("kind", "mlp")
        if not isinstance(kind, str):
            raise ValueError(f"kind must be a string, got {kind!r}")
        entry = ENCODERS.get(kind)
        options = {k: v for k, v in value.items() if k != "kind"}
        try:
            checked = entry.options.model_validate(options)
        except ValidationError as err:
            raise ValueError(
                f"encoder {kind!r}: " + format_validation_error(err, entry.options)
            ) from None
        return {"kind": kind, **checked.model_dump()}

    def options(self) -> dict[str, Any]:
        """Keyword options of the encoder constructor."""
        return self.model_dump(exclude={"kind"})


class MemoryConfig(Section):
    """Options of the cross-modal memory; both alignments are our choice."""

    align_stat: bool = True
    align_learned: bool = True
    stat_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    align_temperature: float = Field(0.1, gt=0.0)
    #: which correlation statistic training uses: this batch's, or the moving average
    train_stat: Literal["batch", "ema"] = "ema"
    gate_bias: float = 1.0
    candidate_init: Literal["identity", "default"] = "identity"


class ModelConfig(Section):
    """Encoders, common width ``dim`` and fusion (default: the strategy's own)."""

    dim: int = Field(128, gt=0)
    #: a registered fusion (``concat``, ``sum``, ``late``, ``shared``, ``memory``, plugins)
    fusion: str | None = None
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    encoders: dict[str, EncoderConfig] = Field(default_factory=dict)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)

    @field_validator("fusion")
    @classmethod
    def _known_fusion(cls, value: str | None) -> str | None:
        if value is not None and value not in FUSIONS:
            raise ValueError(FUSIONS.unknown_message(value))
        return value


class OptimConfig(Section):
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    scheduler: Literal["none", "cosine", "step"] = "none"
    step_size: int = Field(30, gt=0)
    gamma: float = Field(0.1, gt=0.0)
    grad_clip: float | None = Field(None, gt=0.0)
    #: one fused kernel per Adam/AdamW step where torch has it (CPU from torch 2.4, CUDA);
    #: equal to the loop implementation up to float rounding, about a third faster for
    #: shapley_alternating's many small steps; false reproduces runs made before it
    fused: bool = True


class ShapleyConfig(Section):
    """How Shapley values are computed: exact up to ``max_exact`` modalities, else sampled."""

    max_exact: int = Field(8, ge=1, le=16)
    permutations: int = Field(64, gt=0)


class TrainConfig(Section):
    """The training loop: epochs, batches, early stopping on validation, device."""

    epochs: int = Field(40, gt=0)
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(2048, gt=0)
    patience: int | None = Field(15, gt=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    deterministic: bool = True
    shapley: ShapleyConfig = Field(default_factory=ShapleyConfig)
    #: add relative EDM to the final metrics (trains a unimodal model per modality, cached)
    relative_edm: bool = True
    #: drop each (sample, modality) of a training batch with this probability, keeping at
    #: least one modality per sample (robustness to missing modalities)
    missing_rate: float = Field(0.0, ge=0.0, lt=1.0)


DEFAULT_STRATEGY = "shapley_alternating"


class StrategyConfig(Section):
    """Base of every strategy's options; ``name`` selects the strategy."""

    name: str


class RunConfig(Section):
    """Everything that defines one training run."""

    name: str | None = None
    seed: int = Field(0, ge=0)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    strategy: SerializeAsAny[StrategyConfig] = Field(
        default_factory=lambda: _strategy_config({"name": DEFAULT_STRATEGY})
    )
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("strategy", mode="before")
    @classmethod
    def _parse_strategy(cls, value: Any) -> StrategyConfig:
        if isinstance(value, StrategyConfig):
            return value
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise ValueError(f"must be a mapping with a 'name', got {type(value).__name__}")
        return _strategy_config({"name": DEFAULT_STRATEGY, **value})

    @model_validator(mode="after")
    def _resolve_fusion(self) -> RunConfig:
        cls = STRATEGIES.get(self.strategy.name)
        if self.model.fusion is None:
            self.model.fusion = cls.default_fusion
        if cls.fusions is not None and self.model.fusion not in cls.fusions:
            raise ValueError(
                f"strategy {self.strategy.name!r} needs fusion "
                f"{' or '.join(repr(f) for f in cls.fusions)}, got {self.model.fusion!r}"
            )
        return self

    def run_name(self) -> str:
        """The run folder name: ``name`` or ``<dataset>-<strategy>-s<seed>``."""
        return self.name or f"{self.dataset.name}-{self.strategy.name}-s{self.seed}"


def _strategy_config(value: dict[str, Any]) -> StrategyConfig:
    name = value.get("name")
    if not isinstance(name, str):
        raise ValueError("needs a 'name' (one of: " + ", ".join(STRATEGIES.names()) + ")")
    try:
        cls = STRATEGIES.get(name)
    except KeyError as err:
        raise ValueError(str(err.args[0])) from None
    try:
        return cls.config_class.model_validate(value)
    except ValidationError as err:
        raise ValueError(format_validation_error(err, cls.config_class)) from None


# --------------------------------------------------------------------------- building
def parse_override(text: str) -> tuple[list[str], Any]:
    """``key.path=value`` -> (path, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set needs key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``tree[path[0]][path[1]]... = value``, creating sections as needed."""
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "strategy":
            child = {"name": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[path[-1]] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (safe loader) into a dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(p)!r}{where}: not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def build_config(
    base: dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Validate ``base`` (a dict, e.g. from YAML) with ``key=value`` overrides applied."""
    tree: dict[str, Any] = dict(base or {})
    for text in overrides:
        path, value = parse_override(text)
        apply_override(tree, path, value)
    if "strategy" in tree and isinstance(tree["strategy"], str):
        tree["strategy"] = {"name": tree["strategy"]}
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, RunConfig)) from None


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
