"""Strategy: a training method as a small class with hooks on the one training loop.

The trainer (``equimodal.engine.trainer``) owns the loop: epochs, batches, validation,
Shapley measurement, early stopping and checkpoints. A strategy decides what one training
step does (``training_step``, which calls ``ctx.optimizer_step`` once or several times),
how the model predicts (``inference_kwargs``), and what it learns from each validation
report (``on_epoch_end``). Its state is JSON-serialisable and saved with checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from equimodal.config import StrategyConfig
from equimodal.data.batch import MultimodalBatch
from equimodal.engine.distributed import current_shard
from equimodal.models.model import MultimodalModel

if TYPE_CHECKING:
    from equimodal.evaluate import FeatureCache, SplitReport


@dataclass
class TrainContext:
    """What a strategy may use: the model, the optimizer step, the modality names, a seed."""

    model: MultimodalModel
    optimizer: torch.optim.Optimizer
    modalities: tuple[str, ...]
    num_classes: int
    seed: int
    grad_clip: float | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)

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
        loss.backward()
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
        self.optimizer.step()

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


def masked_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy over the rows where ``rows`` is True (0 when there are none).

    Under torchrun the mean is over the selected rows of the global batch.
    """
    shard = current_shard()
    if shard is not None:
        return shard.masked_cross_entropy(logits, labels, rows)
    if bool(rows.all()):
        return F.cross_entropy(logits, labels)
    if not bool(rows.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[rows], labels[rows])


def mean_or_zero(losses: Sequence[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    """Mean of the non-None losses, or a zero tensor on ``like``'s graph."""
    kept = [loss for loss in losses if loss is not None]
    if not kept:
        return like.sum() * 0.0
    return torch.stack(kept).mean()


class Strategy:
    """Base class of every training method; subclasses override the hooks they need."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[StrategyConfig]] = StrategyConfig
    default_fusion: ClassVar[str] = "concat"
    #: fusions the method is defined for (None: any)
    fusions: ClassVar[tuple[str, ...] | None] = None
    #: True when multi-process training (torchrun) reproduces the one-process method:
    #: every batch statistic goes through the TrainContext's global helpers or
    #: ``masked_cross_entropy``, and every decision that changes how many optimizer steps
    #: a batch takes is global (``ctx.global_any``)
    supports_distributed: ClassVar[bool] = False

    def __init__(self, config: StrategyConfig) -> None:
        self.config = config
        self.ctx: TrainContext | None = None

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

    def epoch_log(self) -> dict[str, Any]:
        """Extra fields for this epoch's line of ``history.jsonl`` (e.g. the order used)."""
        return {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state saved with checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
