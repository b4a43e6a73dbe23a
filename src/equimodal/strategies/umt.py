"""``umt``: Uni-Modal Teacher, and with ``ensemble`` the Uni-Modal Ensemble (Du, Teng, Li,
Liu, Yuan, Wang, Yuan, Zhao, *On Uni-Modal Feature Learning in Supervised Multi-Modal
Learning*, ICML 2023).

Source of the rule: BalanceBenchmark (github.com/GeWu-Lab/BalanceBenchmark),
``UMTTrainer`` in ``balancemm/trainer/UMT_trainer.py`` (defaults in
``configs/trainer_config.yaml``: ``scaling`` 10). There the teachers are separate
unimodal runs (``unimodalTrainer``: one encoder and its linear head trained with CE), each
loaded from the checkpoint of its best validation epoch; the multimodal model is then
trained from scratch with

``loss = CE(fused, y) + scaling * sum_m MSE(z_m, t_m)``,

``z_m`` the student's feature of modality ``m`` (the encoder output the fusion reads),
``t_m`` the frozen teacher's feature of the same input (``nn.MSELoss``: the mean over rows
and feature dimensions).

In equimodal both parts run in the one training loop, as two stages:

- **Teacher stage** (epochs ``1..T``). Every modality is trained alone: the loss is
  ``sum_m CE(u_m, y)``, ``u_m`` its own logits (fusion ``late``: its own head; ``concat``:
  its block of the head plus ``b / M``). The modalities share no parameter but, under
  ``concat``, the bias, so each encoder and projection learn from their own CE only. Each
  validation pass measures every modality's stand-alone accuracy; each modality's
  teacher is its encoder and projection at its best stand-alone validation epoch of the
  stage (ties: lower validation loss, then the earlier epoch), as the official loading of
  the best checkpoint. The stage ends after ``teacher_epochs`` epochs, or earlier when no
  modality's stand-alone accuracy has improved for ``teacher_patience`` epochs.
- **Distillation stage.** The teachers are copied out of the model and frozen (evaluation
  mode: no dropout noise in their targets, running batch-norm statistics); the model
  restarts from the weights it had when the strategy was set up (the run's
  initialisation, as a fresh multimodal run starts) with fresh optimizer state, and
  trains with the loss above. Early stopping counts anew from this stage
  (``restarts_patience``).

With ``ensemble`` (UME) the run is the teacher stage only: the modalities are trained
alone throughout and the model predicts with its fused logits, which under ``late`` are
the mean of the unimodal logits and under ``concat`` their sum (the blocks plus the bias),
i.e. the ensemble of the unimodal models. The selected epoch is the one whose ensemble
validates best.

Options: ``scaling`` (10, the official value), ``teacher_epochs`` (20), ``teacher_patience``
(null: the stage lasts ``teacher_epochs``), ``ensemble`` (false). Fusions: ``concat`` (the
official ``ConcatFusion_N``, default) and ``late``; the others share one head between the
modalities, so their teacher stage would not train the modalities apart.

Differences from the official code, and why:

- **One run instead of ``M + 1``.** The teachers are trained by the same loop, model
  class, optimizer and schedule as the student; the learning-rate schedule runs over
  the whole run (the student starts at the schedule's point after the teacher stage).
- **Teachers in evaluation mode.** The official teachers are never put in evaluation
  mode, so their dropout is on and their batch-norm statistics move during
  distillation; here they are fixed functions, as teachers are meant to be.
- **Which epoch the loop selects.** A teacher-stage epoch scores the teachers' ensemble
  (UME), another model; :meth:`UMTStrategy.restarts_selection` makes the loop compare the
  distillation epochs only among themselves, so a UMT run ends on its best student (by
  validation accuracy), as BalanceBenchmark's UMT run selects among its own epochs.
- **Missing modalities** (the official data has none): CE over the rows with at least one
  modality (fused) or with the modality (teacher stage); each MSE over the rows where its
  modality is present; a modality absent from the whole batch takes no part.
- **Distillation window.** The official ``modulation_starts..modulation_ends`` (0..80)
  covers all of its 30 epochs; here every distillation epoch distils.
- Model, optimizer and schedule are equimodal's (the run's config).

The kept teacher weights (raw bytes in base64, exact) go into the strategy state, so
checkpoints hold them and ``--resume`` continues exactly, up to the size limit of
``equimodal.strategies.udi`` (about 3 million float32 parameters in all); beyond it they
live in memory only and a run can be resumed only in its teacher stage, and there only
with the best epochs after the resume.

Ours: any number of modalities (one teacher and one MSE term per modality); the ensemble
option in the same loop.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from equimodal.config import StrategyConfig
from equimodal.data.batch import MultimodalBatch
from equimodal.models.model import MultimodalModel
from equimodal.strategies.base import (
    Strategy,
    TrainContext,
    any_present,
    masked_cross_entropy,
    register_strategy,
)
from equimodal.strategies.udi import STATE_WEIGHTS_LIMIT, decode_tensor, encode_tensor

if TYPE_CHECKING:
    from equimodal.engine.validation import FeatureCache, SplitReport


class UMTConfig(StrategyConfig):
    """Options of ``umt``."""

    name: Literal["umt"] = "umt"
    scaling: float = Field(
        10.0, ge=0.0, description="weight of each modality's feature MSE (official 10)"
    )
    teacher_epochs: int = Field(20, ge=1, description="the longest teacher stage, in epochs")
    teacher_patience: int | None = Field(
        None,
        ge=1,
        description="end the teacher stage once no modality's stand-alone val accuracy has "
        "improved for this many epochs (null: never)",
    )
    ensemble: bool = Field(
        False, description="UME: train the unimodal models only and predict with their ensemble"
    )


def encode_modules(modules: list[torch.nn.Module]) -> list[dict[str, Any]]:
    """The state of each module, every tensor encoded exactly (JSON)."""
    return [{k: encode_tensor(v) for k, v in module.state_dict().items()} for module in modules]


def load_modules(modules: list[torch.nn.Module], states: list[dict[str, Any]]) -> None:
    """Load what :func:`encode_modules` wrote into ``modules`` (same structure)."""
    if len(modules) != len(states):
        raise ValueError(f"strategy umt: kept {len(states)} modules, the model has {len(modules)}")
    with torch.no_grad():
        for module, state in zip(modules, states, strict=True):
            module.load_state_dict({k: decode_tensor(v) for k, v in state.items()})


def encoded_size(states: dict[str, list[dict[str, Any]]]) -> int:
    """Characters of encoded tensor data in ``{modality: modules}``."""
    return sum(
        len(tensor["data"])
        for modules in states.values()
        for module in modules
        for tensor in module.values()
    )


@register_strategy
class UMTStrategy(Strategy):
    """Unimodal teachers first, then the model distilled towards their features; see the
    module doc."""

    name = "umt"
    config_class = UMTConfig
    default_fusion = "concat"
    fusions = ("concat", "late")
    config: UMTConfig

    def __init__(self, config: UMTConfig) -> None:
        super().__init__(config)
        #: 0: teacher stage; 1: distillation stage
        self.stage = 0
        self.stage0_epochs = 0
        self.standalone_accuracy: dict[str, float] = {}
        self.standalone_loss: dict[str, float] = {}
        #: teacher stage: each modality's best stand-alone epoch (``epoch``, ``accuracy``,
        #: ``loss``, ``modules``: its encoder and projection, encoded)
        self.best: dict[str, dict[str, Any]] = {}
        self.best_standalone: dict[str, float] = {}
        self.stale = 0
        #: distillation stage: the teachers' weights (encoded) and their epochs
        self.teacher_state: dict[str, list[dict[str, Any]]] = {}
        self.teacher_epochs: dict[str, int] = {}
        #: the frozen teachers: a copy of the model whose modality modules are the teachers
        self.teacher: MultimodalModel | None = None
        #: the model's weights at setup (CPU), where the student starts
        self.initial: dict[str, torch.Tensor] | None = None
        self._switched = False
        self._trained_stage = 0

    # ------------------------------------------------------------------ set-up
    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        if self.stage == 0 and not self.config.ensemble:
            self.initial = {
                k: v.detach().to("cpu", copy=True) for k, v in ctx.model.state_dict().items()
            }
        if self.stage == 1 and self.teacher is None and self.teacher_state:
            self._build_teacher()

    def _build_teacher(self) -> None:
        """The frozen teacher model from :attr:`teacher_state`."""
        model = self.context.model
        teacher = copy.deepcopy(model)
        for m, states in self.teacher_state.items():
            load_modules(teacher.modality_modules(m), states)
        teacher.requires_grad_(False)
        teacher.eval()
        self.teacher = teacher

    # ------------------------------------------------------------------ training
    def on_epoch_start(self, epoch: int) -> None:
        self._switched = False
        self._trained_stage = self.stage

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        if self.stage == 0:
            return self._teacher_step(batch)
        return self._distill_step(batch)

    def _teacher_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        model = ctx.model
        losses = {}
        for m in ctx.modalities:
            rows = batch.present[m]
            if not bool(rows.any()):
                continue
            logits = model.modality_logits(m, model.encode_modality(m, batch.inputs[m]))
            losses[m] = masked_cross_entropy(logits, batch.labels, rows)
        logs = {f"loss_{m}": float(v.detach()) for m, v in losses.items()}
        if losses:
            ctx.optimizer_step(torch.stack(list(losses.values())).sum())
            logs["loss"] = sum(logs.values()) / len(losses)
        return logs

    def teacher_features(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's ``t_m`` of one modality's input."""
        if self.teacher is None:
            raise RuntimeError("strategy umt: no teachers outside the distillation stage")
        self.teacher.eval()
        with torch.no_grad():
            return self.teacher.encode_modality(modality, x)

    def _distill_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        out = ctx.model(batch)
        rows = any_present(batch.present)
        ce = masked_cross_entropy(out.logits, batch.labels, rows)
        total = ce
        logs = {"ce": float(ce.detach())}
        for m in ctx.modalities:
            present = batch.present[m]
            if not bool(present.any()):
                continue
            target = self.teacher_features(m, batch.inputs[m][present])
            mse = F.mse_loss(out.features[m][present], target)
            total = total + self.config.scaling * mse
            logs[f"mse_{m}"] = float(mse.detach())
        ctx.optimizer_step(total)
        logs["loss"] = float(total.detach())
        return logs

    # ------------------------------------------------------------------ validation
    def prepare_inference(self, cache: FeatureCache) -> None:
        """Measure every modality's stand-alone validation accuracy and loss."""
        with torch.no_grad():
            logits = self.context.model.unimodal_logits(cache.z)
        self.standalone_accuracy, self.standalone_loss = {}, {}
        for m, lg in logits.items():
            rows = cache.present[m]
            lg, y = lg[rows], cache.labels[rows]
            if lg.shape[0] == 0:
                acc, loss = 0.0, math.inf
            else:
                acc = float((lg.argmax(1) == y).float().mean())
                loss = float(F.cross_entropy(lg.float(), y))
            self.standalone_accuracy[m], self.standalone_loss[m] = acc, loss

    def on_epoch_end(self, epoch: int, report: SplitReport) -> None:
        if self.stage != 0 or self.config.ensemble:
            return
        improved = self._keep_best(epoch)
        self.stale = 0 if improved else self.stale + 1
        patience = self.config.teacher_patience
        if epoch >= self.config.teacher_epochs or (patience is not None and self.stale >= patience):
            self.start_distillation(epoch)

    def _keep_best(self, epoch: int) -> bool:
        """Keep each modality's encoder and projection of this epoch if it is its best so far
        (accuracy; ties: lower loss, then the earlier epoch); True if any accuracy rose."""
        rose = False
        for m, acc in self.standalone_accuracy.items():
            if acc > self.best_standalone.get(m, -1.0):
                self.best_standalone[m], rose = acc, True
            loss = self.standalone_loss.get(m, math.inf)
            kept = self.best.get(m)
            if kept is not None and (acc, -loss) <= (kept["accuracy"], -kept["loss"]):
                continue
            self.best[m] = {
                "epoch": epoch,
                "accuracy": acc,
                "loss": loss,
                "modules": encode_modules(self.context.model.modality_modules(m)),
            }
        return rose

    def start_distillation(self, epoch: int) -> None:
        """End the teacher stage after ``epoch``: freeze the teachers (each modality's best
        epoch), restart the model from its initial weights and the optimizer afresh."""
        ctx = self.context
        model = ctx.model
        self.teacher_state, self.teacher_epochs = {}, {}
        for m in ctx.modalities:
            kept = self.best.get(m)
            if kept is None:  # never validated (driven by hand): the current weights
                self.teacher_state[m] = encode_modules(model.modality_modules(m))
                self.teacher_epochs[m] = epoch
            else:
                self.teacher_state[m] = kept["modules"]
                self.teacher_epochs[m] = int(kept["epoch"])
        self._build_teacher()
        if self.initial is not None:
            model.load_state_dict(self.initial)
        ctx.optimizer.state.clear()  # a fresh optimizer for the student
        self.initial = None
        self.best = {}
        self.stage = 1
        self.stage0_epochs = epoch
        self._switched = True

    def restarts_patience(self) -> bool:
        return self._switched

    def restarts_selection(self) -> bool:
        """True right after the distillation stage began: its epochs should be compared
        among themselves, not with the teachers' ensemble (read by a loop that supports it)."""
        return self._switched

    def epoch_log(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "stage": self._trained_stage,  # the stage this epoch trained in
            "standalone_val_accuracy": dict(self.standalone_accuracy),
        }
        if self.stage == 1:
            out["teacher_epochs"] = dict(self.teacher_epochs)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "stage": self.stage,
            "stage0_epochs": self.stage0_epochs,
            "best_standalone": dict(self.best_standalone),
            "stale": self.stale,
            "teacher_epochs": dict(self.teacher_epochs),
        }
        if self.stage == 0:
            weights = {m: kept["modules"] for m, kept in self.best.items()}
            if encoded_size(weights) <= STATE_WEIGHTS_LIMIT:  # entries are replaced, not changed
                state["best"] = dict(self.best)
            else:
                state["best"] = {
                    m: {k: v for k, v in kept.items() if k != "modules"}
                    for m, kept in self.best.items()
                }
        elif encoded_size(self.teacher_state) <= STATE_WEIGHTS_LIMIT:
            state["teachers"] = self.teacher_state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = int(state.get("stage", 0))
        self.stage0_epochs = int(state.get("stage0_epochs", 0))
        self.best_standalone = {m: float(v) for m, v in state.get("best_standalone", {}).items()}
        self.stale = int(state.get("stale", 0))
        self.teacher_epochs = {m: int(v) for m, v in state.get("teacher_epochs", {}).items()}
        if self.stage == 0:
            best = state.get("best") or {}
            # an entry without its weights (over the size limit) cannot be restored
            self.best = {m: kept for m, kept in best.items() if "modules" in kept}
            return
        self.best, self.initial = {}, None
        teachers = state.get("teachers")
        if teachers:
            self.teacher_state = teachers
            self.teacher = None
            if self.ctx is not None:
                self._build_teacher()
        elif self.teacher is None:
            raise ValueError(
                "strategy umt: this state holds no teacher weights (they were over the size "
                "limit of checkpoints), so the distillation stage cannot be resumed"
            )
