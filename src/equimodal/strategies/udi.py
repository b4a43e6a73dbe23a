"""``udi``: unidirectional dynamic interaction (Wang et al., arXiv 2509.02281;
see docs/methods.md).

**A reconstruction.** Only the paper's abstract and third-party reviews are public; what
follows is equimodal's reading, and the parts marked *ours* are our choices.

- **Stage 0.** Every modality is trained alone (its encoder and its own linear head; fusion
  ``late``). Each validation pass measures every modality's stand-alone accuracy and mean
  prediction entropy. Stage 0 ends after ``anchor_epochs`` epochs, or earlier when the best
  stand-alone validation accuracy has not improved for ``anchor_patience`` epochs. Each
  modality's own predictor (encoder, projection, head) is kept as it was at its best
  stand-alone validation epoch of stage 0 (ties: lower validation loss, then the earlier
  epoch). The **anchor** is the modality with the best stand-alone validation accuracy
  over stage 0 (ties: lower mean entropy at that epoch); its predictor is restored to
  those best weights and frozen from then on. The kept weights are part of the strategy
  state (checkpoints), so a run resumed in stage 0 continues exactly, up to a size limit
  (see :meth:`UDIStrategy.state_dict`).
- **Stage 1.** Each other modality (a *follower*) is trained with
  ``CE(z_m, y) + w * (lambda_con * JS(p_anchor || p_m) + lambda_com * L_comp(f_anchor, f_m))``.
  ``L_comp`` (*ours*) is an InfoNCE estimate of the mutual information between the
  follower's and the anchor's features, ``log B - CE(cos(f_m, f_a) / t, diagonal)``;
  minimising it pushes the follower towards what the anchor does not already encode.
  The dynamic weight ``w`` (*ours*) is ``(1 + c) / 2`` with ``c`` the cosine between the
  gradients of the two interaction losses with respect to the follower's features: when
  consistency and complementarity pull the same way both act fully; when they conflict
  both fade and the follower follows its own cross-entropy.
- **Prediction.** The modalities' logits combined (fusion ``late``: their mean, which ranks
  classes as their sum does).

Works for any number of modalities (one anchor, the others followers).
"""

from __future__ import annotations

import base64
import math
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from equimodal.config import StrategyConfig
from equimodal.data.batch import MultimodalBatch
from equimodal.strategies.base import (
    Strategy,
    TrainContext,
    masked_cross_entropy,
    register_strategy,
)

if TYPE_CHECKING:
    from equimodal.engine.validation import FeatureCache, SplitReport


class UDIConfig(StrategyConfig):
    """Options of ``udi``."""

    name: Literal["udi"] = "udi"
    anchor_epochs: int = Field(30, ge=1, description="the longest stage 0 may last")
    anchor_patience: int = Field(
        5, ge=1, description="stage 0 ends when stand-alone val accuracy stalls this long"
    )
    consistency_weight: float = Field(1.0, ge=0.0, description="lambda_con of the JS term")
    complementarity_weight: float = Field(0.1, ge=0.0, description="lambda_com of the InfoNCE term")
    temperature: float = Field(0.1, gt=0.0, description="InfoNCE temperature")
    dynamic_weights: bool = True
    anchor: str | None = Field(None, description="force this anchor instead of choosing it")


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Mean Jensen-Shannon divergence (nats) between the rows' softmax distributions."""
    log_p = F.log_softmax(logits_p, 1)
    log_q = F.log_softmax(logits_q, 1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), 0) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def infonce_mutual_information(
    follower: torch.Tensor, anchor: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE lower bound on I(follower; anchor): ``log B - CE(similarity, diagonal)``."""
    b = follower.shape[0]
    if b < 2:
        return follower.sum() * 0.0
    sim = F.normalize(follower, dim=1) @ F.normalize(anchor, dim=1).T / temperature
    target = torch.arange(b, device=follower.device)
    return math.log(b) - F.cross_entropy(sim, target)


#: the most characters of encoded weights (see :func:`encode_tensor`) that the strategy
#: state carries into checkpoints during stage 0; see :meth:`UDIStrategy.state_dict`
STATE_WEIGHTS_LIMIT = 16_000_000


def choose_anchor(accuracy: dict[str, float], entropy: dict[str, float]) -> str:
    """The modality with the best accuracy; ties go to the lower mean entropy."""
    return min(accuracy, key=lambda m: (-accuracy[m], entropy[m]))


def encode_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    """A tensor as JSON, exactly: dtype, shape and its raw bytes in base64."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
        "data": base64.b64encode(raw).decode("ascii"),
    }


def decode_tensor(encoded: dict[str, Any]) -> torch.Tensor:
    """The tensor :func:`encode_tensor` wrote (on the CPU), bit for bit."""
    dtype = getattr(torch, str(encoded["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {encoded['dtype']!r}")
    shape = [int(n) for n in encoded["shape"]]
    raw = base64.b64decode(encoded["data"])
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


@register_strategy
class UDIStrategy(Strategy):
    """Anchor first, then followers guided by it; see the module doc."""

    name = "udi"
    config_class = UDIConfig
    default_fusion = "late"
    fusions = ("late",)
    config: UDIConfig

    def __init__(self, config: UDIConfig) -> None:
        super().__init__(config)
        self.anchor: str | None = None
        self.standalone_accuracy: dict[str, float] = {}
        self.standalone_entropy: dict[str, float] = {}
        self.standalone_loss: dict[str, float] = {}
        #: during stage 0, each modality's best stand-alone validation epoch: ``epoch``,
        #: ``accuracy``, ``loss``, ``entropy`` and ``modules`` (the state of each module
        #: of its own predictor, tensors encoded exactly); JSON as kept, so that it goes
        #: into checkpoints as it is and a resumed stage 0 restores the same weights
        self.best: dict[str, dict[str, Any]] = {}
        #: the stage-0 epoch whose weights the anchor was frozen with
        self.anchor_epoch: int | None = None
        self.best_standalone = -1.0
        self.stale = 0
        self.stage0_epochs = 0
        self.weight_sum = 0.0
        self.weight_count = 0
        self._switched = False
        self._trained_stage = 0

    def setup(self, ctx: TrainContext) -> None:
        if self.config.anchor is not None and self.config.anchor not in ctx.modalities:
            raise ValueError(
                f"strategy udi: anchor {self.config.anchor!r} is not in the dataset "
                f"(it has {', '.join(ctx.modalities)})"
            )
        super().setup(ctx)
        if self.anchor is not None:
            self._freeze(self.anchor)

    # ------------------------------------------------------------------ stages
    @property
    def stage(self) -> int:
        return 0 if self.anchor is None else 1

    def anchor_modules(self, modality: str) -> list[torch.nn.Module]:
        """The encoder, projection and head that make up one modality's own predictor."""
        return self.context.model.modality_modules(modality, with_head=True)

    def _freeze(self, modality: str) -> None:
        for module in self.anchor_modules(modality):
            module.requires_grad_(False)

    def training_step(self, batch: MultimodalBatch) -> dict[str, float]:
        if self.anchor is None:
            return self._stage0_step(batch)
        return self._stage1_step(batch)

    def _stage0_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        z = ctx.model.encode(batch)
        logits = ctx.model.unimodal_logits(z)
        # separate parameters per modality: the summed loss trains each one alone
        losses = {m: masked_cross_entropy(logits[m], batch.labels, batch.present[m]) for m in z}
        ctx.optimizer_step(torch.stack(list(losses.values())).sum())
        logs = {f"loss_{m}": float(v.detach()) for m, v in losses.items()}
        logs["loss"] = sum(logs.values()) / len(losses)
        return logs

    def _stage1_step(self, batch: MultimodalBatch) -> dict[str, float]:
        ctx = self.context
        model = ctx.model
        anchor = self.anchor
        assert anchor is not None
        for module in self.anchor_modules(anchor):
            module.eval()  # a frozen teacher: no dropout noise in its targets
        with torch.no_grad():
            z_anchor = model.encode_modality(anchor, batch.inputs[anchor])
            logits_anchor = model.modality_logits(anchor, z_anchor)
        total = z_anchor.new_zeros(())
        logs: dict[str, float] = {}
        followers = [m for m in ctx.modalities if m != anchor]
        for m in followers:
            rows = batch.present[m]
            if not bool(rows.any()):
                continue
            z_m = model.encode_modality(m, batch.inputs[m])
            logits_m = model.modality_logits(m, z_m)
            ce = masked_cross_entropy(logits_m, batch.labels, rows)
            both = rows & batch.present[anchor]
            if bool(both.any()):
                con = js_divergence(logits_anchor[both], logits_m[both])
                com = infonce_mutual_information(z_m[both], z_anchor[both], self.config.temperature)
            else:
                con = com = ce * 0.0
            weight = self._dynamic_weight(con, com, z_m)
            total = (
                total
                + ce
                + weight
                * (self.config.consistency_weight * con + self.config.complementarity_weight * com)
            )
            logs[f"loss_{m}"] = float(ce.detach())
            logs[f"js_{m}"] = float(con.detach())
            logs[f"mi_{m}"] = float(com.detach())
            logs[f"weight_{m}"] = weight
        if logs:
            ctx.optimizer_step(total)
        logs["loss"] = float(total.detach()) / max(len(followers), 1)
        return logs

    def _dynamic_weight(self, con: torch.Tensor, com: torch.Tensor, z: torch.Tensor) -> float:
        """``(1 + cos(grad con, grad com)) / 2`` with respect to the follower's features."""
        if not self.config.dynamic_weights:
            return 1.0
        if not (con.requires_grad and com.requires_grad):
            return 1.0
        (g_con,) = torch.autograd.grad(con, z, retain_graph=True, allow_unused=True)
        (g_com,) = torch.autograd.grad(com, z, retain_graph=True, allow_unused=True)
        if g_con is None or g_com is None:
            return 1.0
        cos = F.cosine_similarity(g_con.flatten(), g_com.flatten(), dim=0, eps=1e-12)
        weight = float((1.0 + cos) / 2.0)
        self.weight_sum += weight
        self.weight_count += 1
        return weight

    # ------------------------------------------------------------------ validation
    def prepare_inference(self, cache: FeatureCache) -> None:
        """Measure every modality's stand-alone validation accuracy and mean entropy."""
        model = self.context.model
        with torch.no_grad():
            logits = model.unimodal_logits(cache.z)
        self.standalone_accuracy, self.standalone_entropy, self.standalone_loss = {}, {}, {}
        for m, lg in logits.items():
            rows = cache.present[m]
            lg, y = lg[rows], cache.labels[rows]
            if lg.shape[0] == 0:
                acc, ent, loss = 0.0, math.inf, math.inf
            else:
                acc = float((lg.argmax(1) == y).float().mean())
                p = torch.softmax(lg, 1)
                ent = float(-(p * torch.log(p.clamp_min(1e-12))).sum(1).mean())
                loss = float(F.cross_entropy(lg.float(), y))
            self.standalone_accuracy[m] = acc
            self.standalone_entropy[m] = ent
            self.standalone_loss[m] = loss

    def on_epoch_start(self, epoch: int) -> None:
        self._switched = False
        self._trained_stage = self.stage
        self.weight_sum, self.weight_count = 0.0, 0

    def on_epoch_end(self, epoch: int, report: SplitReport) -> None:
        if self.anchor is not None:
            return
        self._keep_best(epoch)
        best = max(self.standalone_accuracy.values(), default=0.0)
        if best > self.best_standalone:
            self.best_standalone, self.stale = best, 0
        else:
            self.stale += 1
        if epoch >= self.config.anchor_epochs or self.stale >= self.config.anchor_patience:
            accuracy = dict(self.standalone_accuracy)
            entropy = dict(self.standalone_entropy)
            for m, kept in self.best.items():  # each modality at its best epoch
                accuracy[m], entropy[m] = kept["accuracy"], kept["entropy"]
            anchor = self.config.anchor or choose_anchor(accuracy, entropy)
            self.anchor_epoch = self._restore_best(anchor, epoch)
            self.anchor = anchor
            self.stage0_epochs = epoch
            self.best = {}  # stage 1 needs them no more
            self._freeze(anchor)
            self._switched = True

    def _keep_best(self, epoch: int) -> None:
        """Keep each modality's predictor of this epoch if it is its best so far (accuracy;
        ties: lower loss; then the earlier epoch)."""
        for m, acc in self.standalone_accuracy.items():
            loss = self.standalone_loss.get(m, math.inf)
            kept = self.best.get(m)
            if kept is not None and (acc, -loss) <= (kept["accuracy"], -kept["loss"]):
                continue
            self.best[m] = {
                "epoch": epoch,
                "accuracy": acc,
                "loss": loss,
                "entropy": self.standalone_entropy.get(m, math.inf),
                "modules": [
                    {k: encode_tensor(v) for k, v in module.state_dict().items()}
                    for module in self.anchor_modules(m)
                ],
            }

    def _restore_best(self, modality: str, epoch: int) -> int:
        """Load ``modality``'s predictor at its best stage-0 epoch; returns that epoch
        (``epoch``, the current one, when none was kept: a checkpoint of an older equimodal)."""
        kept = self.best.get(modality)
        if kept is None:
            return epoch
        modules = self.anchor_modules(modality)
        if len(modules) != len(kept["modules"]):
            raise ValueError(
                f"strategy udi: kept {len(kept['modules'])} modules of {modality!r}, "
                f"the model has {len(modules)}"
            )
        with torch.no_grad():
            for module, state in zip(modules, kept["modules"], strict=True):
                module.load_state_dict({k: decode_tensor(v) for k, v in state.items()})
        return int(kept["epoch"])

    def restarts_patience(self) -> bool:
        return self._switched

    def epoch_log(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "stage": self._trained_stage,  # the stage this epoch trained in
            "standalone_val_accuracy": dict(self.standalone_accuracy),
        }
        if self.anchor is not None:
            out["anchor"] = self.anchor
            out["anchor_epoch"] = self.anchor_epoch
        if self.weight_count:
            out["interaction_weight"] = self.weight_sum / self.weight_count
        return out

    # ------------------------------------------------------------------ state
    # Stage 0 keeps each modality's best predictor in the state (base64 of the raw bytes:
    # exact, about 1.33 characters a byte), so a run killed in stage 0 resumes with the
    # same best weights, exactly. The state lives in the checkpoints' JSON header, which
    # safetensors caps at 100 MB and last.safetensors holds twice (its resume state has
    # the best epoch's strategy state too), so the weights go into the state only up to
    # STATE_WEIGHTS_LIMIT characters in all (about 3 million float32 parameters over every
    # modality's encoder, projection and head; the MLPs of the feature datasets are far
    # below, two ResNet-18s far above). Beyond it they are kept in memory only: the run
    # itself is unchanged, but a run resumed in stage 0 knows only the best epochs after
    # the resume (the anchor's ``anchor_epoch`` says which weights it froze). Stage 1
    # drops them.
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "anchor": self.anchor,
            "anchor_epoch": self.anchor_epoch,
            "stage0_epochs": self.stage0_epochs,
            "best_standalone": self.best_standalone,
            "stale": self.stale,
        }
        if self.anchor is None:
            size = sum(
                len(tensor["data"])
                for kept in self.best.values()
                for module in kept["modules"]
                for tensor in module.values()
            )
            if size <= STATE_WEIGHTS_LIMIT:  # entries are replaced, never changed in place
                state["best"] = dict(self.best)
            else:
                state["best"] = {
                    m: {k: v for k, v in kept.items() if k != "modules"}
                    for m, kept in self.best.items()
                }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor = state.get("anchor")
        epoch = state.get("anchor_epoch")
        self.anchor_epoch = None if epoch is None else int(epoch)
        self.stage0_epochs = int(state.get("stage0_epochs", 0))
        self.best_standalone = float(state.get("best_standalone", -1.0))
        self.stale = int(state.get("stale", 0))
        best = (state.get("best") or {}) if self.anchor is None else {}
        # an entry without its weights (over STATE_WEIGHTS_LIMIT) cannot be restored
        self.best = {m: kept for m, kept in best.items() if "modules" in kept}
        if self.ctx is not None:
            for m in self.context.modalities:
                for module in self.anchor_modules(m):
                    module.requires_grad_(m != self.anchor)
