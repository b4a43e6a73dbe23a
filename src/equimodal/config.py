"""Run configuration: pydantic models, YAML in and out, one-line errors.

Every section forbids unknown keys; an error names the key path and the closest valid
name. Strategy options live in the ``strategy`` section next to its ``name`` and are
validated by the options model that the strategy registers.
"""

from __future__ import annotations

import importlib
import os
import re
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
    """Base of every config section: unknown keys are errors, values are re-validated.

    Floats must be finite: a NaN or infinite learning rate, weight or temperature is never
    meant (YAML reads ``.nan`` and ``.inf`` as floats) and would only surface as a diverged
    run.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
        if ":" in kind:  # torchvision:resnet18, timm:<name>: the library's model by name
            kind, _, model_name = kind.partition(":")
            if "name" in value and value["name"] != model_name:
                raise ValueError(
                    f"kind {value['kind']!r} names model {model_name!r} but name is "
                    f"{value['name']!r}"
                )
            value = {**value, "kind": kind, "name": model_name}
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
    """Options of the cross-modal memory; both alignments are our choice.

    The correlation statistic ``C_ij`` of each pair of modalities is computed on every
    training batch (the global batch under torchrun) and kept as a moving average, which
    evaluation always reads. The average of a pair moves once per training batch, whatever
    the strategy: ``shapley_alternating`` runs the chain over every prefix of the order
    within one batch, but the same features give the same statistic, and the memory folds
    a statistic into a pair's average only when it differs from the one that pair folded
    last. Training reads the moving average (``train_stat: ema``, the default) or the
    batch's own statistic (``batch``).
    """

    #: align the memory with the correlation statistic ``C_ij``
    align_stat: bool = True
    #: add a learned map ``A_ij`` per pair (zero at start; one parameter per pair, so a
    #: training step that reads no (i, j) leaves it exactly as it was)
    align_learned: bool = True
    #: momentum of the moving average of ``C_ij``, per training batch
    stat_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    align_temperature: float = Field(0.1, gt=0.0)
    #: which correlation statistic training uses: ``ema`` the moving average, updated with
    #: the batch first (default: on synthetic data the batch statistic jittered from batch
    #: to batch and joint training learned slower), or ``batch`` this batch's statistic
    train_stat: Literal["batch", "ema"] = "ema"
    gate_bias: float = 1.0
    candidate_init: Literal["identity", "default"] = "identity"


#: the largest common width ``model.dim``; the memory fusion holds dim x dim matrices
MAX_DIM = 16384


class ModelConfig(Section):
    """Encoders, common width ``dim`` and fusion (default: the strategy's own)."""

    #: at most MAX_DIM: a larger width is a typo, and allocating it would crash
    dim: int = Field(128, gt=0, le=MAX_DIM)
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


#: the experiment trackers ``train.loggers`` may name (``equimodal.engine.loggers``)
LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")


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
    #: score the test split once at the end (false: tuning runs, which choose settings on
    #: validation and must never read test; their metrics have no test scores)
    score_test: bool = True
    #: the training steps' arithmetic: ``fp32``, or autocast to ``bf16`` (CPU and CUDA) or
    #: ``fp16`` (CUDA only, with a gradient scaler); weights, optimizer state, validation,
    #: Shapley values and EDM stay in fp32
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: channels-last memory layout for the convolutions of image and spectrogram encoders
    #: (``auto``: on CUDA only, where it speeds up convolutions in reduced precision)
    channels_last: Literal["auto"] | bool = "auto"
    loggers: list[str] = Field(
        default_factory=list,
        description=(
            "experiment trackers that log every epoch (train losses, validation accuracy "
            "and loss, Shapley values and shares, EDM, the modality order), the config and "
            "the final metrics: any of " + ", ".join(LOGGERS) + "; written under the run "
            "folder (an in-memory run, without one, logs nothing)"
        ),
    )

    @field_validator("loggers")
    @classmethod
    def _known_loggers(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in LOGGERS:
                raise ValueError(f"unknown logger {name!r}; valid loggers: {', '.join(LOGGERS)}")
        if len(set(value)) != len(value):
            raise ValueError(f"lists a logger twice: {', '.join(value)}")
        return value


DEFAULT_STRATEGY = "shapley_alternating"
#: the longest run name: file systems allow 255 bytes, and "-2", "-3"... may be appended
MAX_NAME_BYTES = 200
#: the largest seed every seeded library takes (scikit-learn's ``random_state``: 2**32 - 1)
MAX_SEED = 2**32 - 1


class StrategyConfig(Section):
    """Base of every strategy's options; ``name`` selects the strategy."""

    name: str


class RunConfig(Section):
    """Everything that defines one training run."""

    name: str | None = None
    seed: int = Field(0, ge=0, le=MAX_SEED)
    #: Python modules imported before the rest is read: they register your own encoders,
    #: fusions, strategies or datasets (``imports: [mylab.encoders]``)
    imports: list[str] = Field(default_factory=list)
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

    @field_validator("imports")
    @classmethod
    def _module_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _MODULE_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a Python module name (a.b.c)")
        return value

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str | None) -> str | None:
        """``name`` becomes one folder inside ``--out``: no path, no control characters."""
        if not value:
            return None  # "" like None: the default name
        if value in (".", "..") or "/" in value or "\\" in value:
            raise ValueError("must be a folder name, not a path")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("must not hold control characters")
        try:
            size = len(os.fsencode(value))
        except UnicodeError:
            raise ValueError("is not a valid folder name") from None
        if size > MAX_NAME_BYTES:
            raise ValueError(f"must be at most {MAX_NAME_BYTES} bytes long, got {size} bytes")
        return value

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


_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def import_modules(names: Any) -> None:
    """Import the modules of a config's ``imports`` (they register plugins);
    ConfigError naming the module that fails."""
    if names is None:
        return
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"imports: must be a list of module names, got {names!r}")
    for name in names:
        if not _MODULE_NAME.fullmatch(name):
            raise ConfigError(f"imports: {name!r} is not a Python module name (a.b.c)")
        try:
            importlib.import_module(name)
        except Exception as err:  # the user's module: any error is theirs, one line
            raise ConfigError(
                f"imports: module {name!r} could not be imported ({type(err).__name__}: {err})"
            ) from None


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
#: what PyYAML's constructors raise besides YAMLError on odd input ("!!timestamp x",
#: "2001-13-45", "!!float"); RecursionError: brackets nested thousands deep
YAML_CONSTRUCT_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError)


def _yaml_load(text: str) -> Any:
    """``yaml.safe_load``, with a RecursionError as a ConfigError (the caller adds where)."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise ConfigError("the value is nested too deeply") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``key.path=value`` -> (path, YAML-parsed value); a value YAML cannot read stays text."""
    if "=" not in text:
        raise ConfigError(f"--set needs key=value, got {_short(text)}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {_short(text)}")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except ConfigError as err:
        raise ConfigError(f"--set {_short(key)}: {err}") from None
    except (yaml.YAMLError, *YAML_CONSTRUCT_ERRORS):
        value = raw
    return key.split("."), value


def _short(text: str, limit: int = 120) -> str:
    """``repr(text)``, cut to about ``limit`` characters."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


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
    """Read a YAML config file (safe loader) into a dict; a ConfigError names the file."""
    p = Path(path)
    where = f"config file {str(p)!r}"
    if p.is_dir():
        raise ConfigError(f"{where} is a folder, not a file")
    if not p.is_file():
        raise ConfigError(f"{where} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{where} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
        ) from None
    try:
        data = _yaml_load(text)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{line}: not valid YAML") from None
    except YAML_CONSTRUCT_ERRORS as err:
        detail = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(f"{where}: not valid YAML ({detail})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping at the top level")
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
    import_modules(tree.get("imports"))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, RunConfig)) from None


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
