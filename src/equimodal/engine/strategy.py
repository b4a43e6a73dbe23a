"""What the training loop knows of a method: the :class:`Strategy` hooks, the
:class:`TrainContext` it hands them, and the registry lookup that builds one from config.

Concrete methods live in :mod:`equimodal.strategies` (one file each); the loop in
:mod:`equimodal.engine.trainer` calls only the hooks and declared attributes defined here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from equimodal.config import StrategyConfig
from equimodal.core.registries import STRATEGIES
from equimodal.core.shard import current_shard
from equimodal.data.batch import MultimodalBatch
from equimodal.models.model import MultimodalModel

if TYPE_CHECKING:
    from equimodal.engine.validation import FeatureCache, SplitReport


@dataclass
class TrainContext:
    """What a strategy may use: the model, the optimizer step, the modality names, a seed."""

    model: MultimodalModel
    optimizer: torch.optim.Optimizer
    modalities: tuple[str, ...]
    num_classes: int
    seed: int
    grad_clip: float | None = None
    #: a CPU generator seeded from ``seed`` (when not given). Its state is not in the
    #: checkpoints: a strategy whose draws must continue exactly after ``--resume`` keeps
    #: its own generator in its state (``opm``, ``amco`` do)
    generator: torch.Generator | None = None
    #: how many batches (training steps' calls) the loop gives each epoch (None: unknown)
    batches_per_epoch: int | None = None
    #: the gradient scaler of ``train.precision: fp16`` (None otherwise)
    scaler: Any = None

    def __post_init__(self) -> None:
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(self.seed)

    def optimizer_step(
        self, loss: torch.Tensor, modify_gradients: Callable[[], None] | None = None
    ) -> None:
        """Zero the gradients, back-propagate ``loss``, clip, and step the optimizer.

        ``modify_gradients`` runs between the backward pass and clipping (gradient
        modulation methods use it). Parameters that received no gradient (e.g. frozen
        encoders in an alternating step) are skipped by the optimizer, weight decay
        included.
        """
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.scaler
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:  # fp16: true gradients before they are modified or clipped
            scaler.unscale_(self.optimizer)
        shard = current_shard()
        if shard is not None:  # torchrun: the global batch's gradient on every rank
            shard.reduce_gradients(self.model.parameters())
        if modify_gradients is not None:
            modify_gradients()
            if shard is not None:  # rank 0's modification (its noise, say) everywhere
                shard.broadcast_gradients(self.model.parameters())
        if self.grad_clip is not None:
            params = [p for p in self.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        if scaler is None:
            self.optimizer.step()
        else:  # skips the step when a gradient overflowed, and adapts the scale
            scaler.step(self.optimizer)
            scaler.update()

    # ------------------------------------------------------------------ global batch
    # Under torchrun each rank holds a shard of the global batch. Statistics a strategy
    # computes over "the batch" go through these helpers, which return the global batch's
    # value there and exactly what the plain code returns on one process.
    @property
    def sharded(self) -> bool:
        """True while training on one rank's shard of a global batch (torchrun)."""
        return current_shard() is not None

    def global_any(self, mask: torch.Tensor) -> bool:
        """Whether any row of the (global) batch has ``mask`` set."""
        shard = current_shard()
        return bool(mask.any()) if shard is None else shard.any(mask)

    def global_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the ranks' shards (``x`` itself on one process); no gradient."""
        shard = current_shard()
        return x if shard is None else shard.all_sum(x)

    def batch_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The global batch's mean of a per-shard mean ``value`` (``value`` on one process)."""
        shard = current_shard()
        return value if shard is None else shard.batch_mean(value)

    def row_mean(self, x: torch.Tensor) -> torch.Tensor:
        """``x.mean(0)`` over the rows of the global batch; no gradient across ranks."""
        shard = current_shard()
        return x.mean(0) if shard is None else shard.row_mean(x)


class Strategy:
    """Base class of every training method; subclasses override the hooks they need."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[StrategyConfig]] = StrategyConfig
    default_fusion: ClassVar[str] = "concat"
    #: fusions the method is defined for (None: any)
    fusions: ClassVar[tuple[str, ...] | None] = None
    #: False for a method whose model is not multimodal (``unimodal``): analyses that
    #: compare a run with its modalities' stand-alone abilities (relative EDM) skip it
    measures_relative_edm: ClassVar[bool] = True
    #: True when multi-process training (torchrun) reproduces the one-process method:
    #: every batch statistic goes through the TrainContext's global helpers or
    #: ``masked_cross_entropy``, and every decision that changes how many optimizer steps
    #: a batch takes is global (``ctx.global_any``)
    supports_distributed: ClassVar[bool] = False

    def __init__(self, config: StrategyConfig) -> None:
        self.config = config
        self.ctx: TrainContext | None = None

    @property
    def schedule_value(self) -> str:
        """The coalition value (``accuracy``, ``neg_loss``, ``true_class_prob``) whose
        Shapley values the loop computes on validation for this method's scheduling, in
        ``report.schedule_shapley``; reported accuracy Shapley values are always computed."""
        return "accuracy"

    def schedule_inference(self) -> dict[str, Any] | None:
        """The ``model.fuse`` arguments each epoch's validation Shapley values (the ones a
        method schedules by, logged per epoch) are computed with; None: as the model
        predicts (:meth:`inference_kwargs`). The final scores always use the latter."""
        return None

    # ------------------------------------------------------------------ set-up
    def setup(self, ctx: TrainContext) -> None:
        """Called once before training with the model and optimizer."""
        self.ctx = ctx

    @property
    def context(self) -> TrainContext:
        if self.ctx is None:
            raise RuntimeError(f"strategy {self.name!r} is used before setup()")
        return self.ctx

    # ------------------------------------------------------------------ hooks
    def on_epoch_start(self, epoch: int) -> None:
        """Called before the batches of ``epoch`` (1-based)."""

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        """Train on one batch; return the losses to log (floats)."""
        raise NotImplementedError

    def prepare_inference(self, cache: FeatureCache) -> None:
        """Called with the cached validation features before validation is scored."""

    def inference_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.fuse`` that define how this method predicts."""
        return {}

    def on_epoch_end(self, epoch: int, report: SplitReport) -> None:
        """Called after validation of ``epoch`` (the report holds accuracy and Shapley values)."""

    def restarts_patience(self) -> bool:
        """True right after ``on_epoch_end`` started a new stage: early stopping counts anew."""
        return False

    def restarts_selection(self) -> bool:
        """True right after ``on_epoch_end`` started a stage whose epochs the loop compares
        only among themselves when it keeps the best model (``umt``'s student: its teacher
        stage scores another model, the teachers' ensemble)."""
        return False

    def epoch_log(self) -> dict[str, Any]:
        """Extra fields for this epoch's line of ``history.jsonl`` (e.g. the order used)."""
        return {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state saved with checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: register a Strategy subclass under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    STRATEGIES.add(cls.name, cls)
    return cls


def get_strategy_class(name: str) -> type[Strategy]:
    """The Strategy class registered as ``name``; KeyError with the closest name otherwise."""
    return STRATEGIES.get(name)


def strategy_names() -> list[str]:
    """Names of all registered strategies."""
    return STRATEGIES.names()


def build_strategy(config: StrategyConfig) -> Strategy:
    """Instantiate the strategy named by ``config.name`` with its validated options."""
    return get_strategy_class(config.name)(config)
