"""MultimodalModel = per-modality encoders + projections to a common width + fusion."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from equimodal.data.base import ModalitySpec
from equimodal.data.batch import MultimodalBatch
from equimodal.models.encoders import build_encoder
from equimodal.models.fusion import Fusion, FusionOutput, build_fusion

#: a calibrated decision rule: ``(per-modality logits, present masks) -> logits``
#: (``equimodal.balance.decision.Calibration`` is one)
Calibration = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass
class ModelOutput:
    """What a forward pass returns.

    ``logits`` ``(B, C)``; ``unimodal_logits`` per modality (when asked for);
    ``features`` the projected ``z_m`` per modality; ``aux_losses`` the fusion's auxiliary
    losses (the memory's alignment losses).
    """

    logits: torch.Tensor
    unimodal_logits: dict[str, torch.Tensor] | None
    features: dict[str, torch.Tensor]
    aux_losses: list[torch.Tensor | None]


def induce_orders(
    orders: Sequence[Sequence[str]],
    subset: Iterable[str],
    weights: Sequence[float] | None = None,
) -> tuple[list[tuple[str, ...]], list[float]]:
    """Orders restricted to ``subset``, de-duplicated, with summed weights (default 1 each).

    Averaging the memory state over ``orders`` while reading only ``subset`` equals the
    weighted average over the induced orders, at a fraction of the cost.
    """
    keep = set(subset)
    totals: Counter[tuple[str, ...]] = Counter()
    for order, w in zip(
        orders, weights if weights is not None else [1.0] * len(orders), strict=True
    ):
        totals[tuple(m for m in order if m in keep)] += float(w)
    totals.pop((), None)
    induced = list(totals)
    return induced, [totals[o] for o in induced]


def module_out_dim(module: nn.Module, spec: ModalitySpec) -> int:
    """The feature width of a user's encoder: its ``out_dim`` attribute, or measured.

    Without ``out_dim`` the module encodes two zero samples of ``spec.shape`` (in eval
    mode, no gradient; its mode is restored) and must return ``(2, width)``.
    """
    declared = getattr(module, "out_dim", None)
    if declared is not None:
        if not isinstance(declared, int) or declared < 1:
            raise ValueError(
                f"modality {spec.name!r}: the encoder's out_dim must be a positive int, "
                f"got {declared!r}"
            )
        return declared
    was_training = module.training
    module.eval()
    try:
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            out = module(torch.zeros((2, *spec.shape), device=device))
    except Exception as err:
        raise ValueError(
            f"modality {spec.name!r}: could not run the encoder {type(module).__name__} on "
            f"a zero input of shape (2, {', '.join(map(str, spec.shape))}) to measure its "
            f"output width ({type(err).__name__}: {err}); give it an out_dim attribute"
        ) from None
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"modality {spec.name!r}: the encoder {type(module).__name__} must return "
            f"(batch, features), got {shape}"
        )
    return int(out.shape[1])


class Projection(nn.Module):
    """``z = LayerNorm(W f + b)``: an encoder feature mapped to the common width."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(f))


class MultimodalModel(nn.Module):
    """Encoders, projections and a fusion; runs on any subset and any order of modalities.

    **Public API for training methods.** A strategy reads and changes the model only through
    these: :meth:`encode_modality` / :meth:`encode` (features ``z_m``), :meth:`fuse` (logits
    of any subset and order, with call-time ``fusion_kwargs``), :meth:`unimodal_logits` /
    :meth:`modality_logits` (one modality's own logits), :meth:`modality_parameters` and
    :meth:`modality_modules` (one modality's encoder and projection, optionally with its own
    head), :meth:`head_parameters` / :meth:`head_weight` (the classifier), and
    :meth:`fusion_parameters` (everything after the projections), :meth:`cross_modal_parameters`
    (what carries the other modalities into one modality's branch). The attributes
    ``encoders``, ``projections`` and ``fusion`` are internals.
    """

    def __init__(
        self,
        specs: Sequence[ModalitySpec],
        num_classes: int,
        dim: int = 128,
        fusion: str = "concat",
        encoders: Mapping[str, tuple[str, Mapping[str, object]] | nn.Module] | None = None,
        fusion_options: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__()
        if len(specs) < 1:
            raise ValueError("a model needs at least one modality")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.specs = tuple(specs)
        self.modalities = tuple(s.name for s in specs)
        self.num_classes = num_classes
        self.dim = dim
        encoders = dict(encoders or {})
        self.encoders = nn.ModuleDict()
        self.projections = nn.ModuleDict()
        for spec in self.specs:
            given = encoders.get(spec.name, ("mlp", {}))
            if isinstance(given, nn.Module):  # the user's own module
                encoder, out_dim = given, module_out_dim(given, spec)
            else:
                kind, options = given
                encoder = build_encoder(spec, kind, **dict(options))
                out_dim = encoder.out_dim
            self.encoders[spec.name] = encoder
            self.projections[spec.name] = Projection(out_dim, dim)
        self.fusion_name = fusion
        self.fusion: Fusion = build_fusion(
            fusion, self.modalities, dim, num_classes, **dict(fusion_options or {})
        )

    @property
    def uses_order(self) -> bool:
        """Whether the fusion reads the modalities in an order (the memory does)."""
        return bool(self.fusion.uses_order)

    # ------------------------------------------------------------------ parts
    def modality_modules(self, modality: str, with_head: bool = False) -> list[nn.Module]:
        """The encoder and projection of one modality; ``with_head`` adds the classifier
        that reads it (its own head in ``late`` fusion, the shared head otherwise)."""
        self._check([modality])
        modules: list[nn.Module] = [self.encoders[modality], self.projections[modality]]
        if with_head:
            modules.extend(self.fusion.head_modules(modality))
        return modules

    def modality_parameters(self, modality: str, with_head: bool = False) -> list[nn.Parameter]:
        """Parameters of :meth:`modality_modules` (encoder and projection, optionally head)."""
        return [
            p for module in self.modality_modules(modality, with_head) for p in module.parameters()
        ]

    def head_parameters(self, modality: str | None = None) -> list[nn.Parameter]:
        """Parameters of the linear classifier(s): all, or the one that reads ``modality``."""
        return [p for module in self.fusion.head_modules(modality) for p in module.parameters()]

    def head_weight(self, modality: str | None = None) -> nn.Parameter:
        """The ``(C, d)`` weight of the classifier that reads ``modality`` (or of the only one)."""
        heads = self.fusion.head_modules(modality)
        if len(heads) != 1 or not isinstance(getattr(heads[0], "weight", None), nn.Parameter):
            raise ValueError(
                f"fusion {self.fusion_name!r} has {len(heads)} classifiers; name a modality"
            )
        return heads[0].weight

    def fusion_parameters(self) -> list[nn.Parameter]:
        """Every parameter after the projections: the fusion (memory, fills) and its head."""
        return list(self.fusion.parameters())

    def cross_modal_parameters(self, modality: str) -> list[nn.Parameter]:
        """The fusion's parameters that carry the other modalities into ``modality``'s
        branch (the ``mmtm`` fusion's squeeze and excitation); empty for other fusions."""
        self._check([modality])
        return self.fusion.cross_modal_parameters(modality)

    def decision_weights(self) -> dict[str, torch.Tensor]:
        """Per modality, the ``(C, d)`` block of the classifier that maps ``z_m`` to logits."""
        return self.fusion.decision_weights()

    # ------------------------------------------------------------------ computing
    def unimodal_logits(self, z: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's own logits from its features ``z_m`` (as the fusion defines them)."""
        return self.fusion.unimodal_logits(dict(z))

    def modality_logits(self, modality: str, z: torch.Tensor) -> torch.Tensor:
        """The logits of one modality's features ``z`` alone."""
        return self.fusion.unimodal_logits({modality: z})[modality]

    def encode_modality(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """``z_m`` of one modality's input."""
        return self.projections[modality](self.encoders[modality](x))

    def encode(
        self, batch: MultimodalBatch, modalities: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Projected features ``z_m`` of the named modalities (all by default)."""
        names = self._check(modalities)
        return {m: self.encode_modality(m, batch.inputs[m]) for m in names}

    def fuse(
        self,
        z: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor],
        modalities: Sequence[str] | None = None,
        orders: Sequence[Sequence[str]] | None = None,
        weights: Sequence[float] | None = None,
        align_loss: bool = False,
        calibration: Calibration | None = None,
        fusion_kwargs: Mapping[str, Any] | None = None,
    ) -> FusionOutput:
        """Fuse precomputed features, reading only ``modalities`` (all by default).

        For an order-dependent fusion, ``orders`` (over all or some modalities) are
        restricted to ``modalities`` and the state is averaged over them. With a
        ``calibration`` the logits are the calibrated decision of the modalities' own
        logits. ``fusion_kwargs`` are options of the fusion's call (``combine`` of the
        ``shared`` fusion).
        """
        names = self._check(
            modalities if modalities is not None else [m for m in self.modalities if m in z]
        )
        if not names:
            raise ValueError("fuse needs at least one modality")
        zs = {m: z[m] for m in names}
        ps = {m: present[m] for m in names}
        if calibration is not None:
            logits = calibration(self.fusion.unimodal_logits(zs), ps)
            return FusionOutput(logits=logits, fused=logits, aux_losses=[])
        if self.fusion.uses_order:
            if orders is None:
                orders, weights = [tuple(names)], None
            else:
                orders, weights = induce_orders(orders, names, weights)
                if len(orders) == 1:
                    weights = None
        return self.fusion(
            zs,
            ps,
            orders=orders,
            weights=weights,
            align_loss=align_loss,
            **dict(fusion_kwargs or {}),
        )

    @torch.no_grad()
    def fuse_coalitions(
        self,
        z: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor],
        coalitions: Sequence[Sequence[str]],
        orders: Sequence[Sequence[str]] | None = None,
        weights: Sequence[float] | None = None,
        calibration: Calibration | None = None,
        max_rows: int = 4096,
        fusion_kwargs: Mapping[str, Any] | None = None,
    ) -> list[torch.Tensor]:
        """Logits ``(B, C)`` of each coalition, as :meth:`fuse` gives them, in one pass.

        Evaluation of many coalitions (Shapley values): with the memory fusion in eval mode
        every (coalition, induced order) of ``orders`` goes through one prefix tree
        (:mod:`equimodal.models.order_tree`), so a prefix shared by several coalitions or
        orders is computed once and each level is a few batched products. Rows missing a
        modality, calibrated inference, training mode and the other fusions take
        :meth:`fuse` per coalition, ``max_rows`` rows at a time.
        """
        names = [self._check(c) for c in coalitions]
        if any(not c for c in names):
            raise ValueError("fuse_coalitions needs at least one modality per coalition")
        if not names:
            return []
        ref = next(iter(z.values()))
        n = ref.shape[0]
        tree_rows = torch.zeros(n, dtype=torch.bool, device=ref.device)
        if self.fusion.uses_order and calibration is None and not self.training:
            used = sorted({m for c in names for m in c})
            tree_rows = torch.ones_like(tree_rows)
            for m in used:
                tree_rows &= present[m]
        out = [ref.new_empty(n, self.num_classes) for _ in names]
        if bool(tree_rows.any()):
            rows = tree_rows.nonzero().squeeze(1) if not bool(tree_rows.all()) else None
            for k, logits in enumerate(self._tree_logits(z, names, orders, weights, rows)):
                out[k][tree_rows] = logits
        rest = (~tree_rows).nonzero().squeeze(1)
        for start in range(0, rest.numel(), max_rows):
            idx = rest[start : start + max_rows]
            zs = {m: v.index_select(0, idx) for m, v in z.items()}
            ps = {m: v.index_select(0, idx) for m, v in present.items()}
            for k, members in enumerate(names):
                out[k][idx] = self.fuse(
                    zs,
                    ps,
                    modalities=members,
                    orders=orders,
                    weights=weights,
                    calibration=calibration,
                    fusion_kwargs=fusion_kwargs,
                ).logits
        return out

    def _tree_logits(
        self,
        z: Mapping[str, torch.Tensor],
        coalitions: Sequence[Sequence[str]],
        orders: Sequence[Sequence[str]] | None,
        weights: Sequence[float] | None,
        rows: torch.Tensor | None,
    ) -> torch.Tensor:
        """Memory fusion: the logits of every coalition through one prefix tree."""
        index = {m: k for k, m in enumerate(self.modalities)}
        targets = []
        for members in coalitions:
            if orders is None:
                induced, w = [tuple(members)], [1.0]
            else:
                induced, w = induce_orders(orders, members, weights)
                if not induced:
                    raise ValueError(f"no order reads any of {', '.join(members)}")
            targets.append([([index[m] for m in o], wk) for o, wk in zip(induced, w, strict=True)])
        ref = next(iter(z.values()))
        stacked = torch.stack(
            [z[m] if m in z else ref.new_zeros(ref.shape[0], self.dim) for m in self.modalities],
            dim=1,
        )
        if rows is not None:
            stacked = stacked.index_select(0, rows)
        return self.fusion.tree_states(stacked, targets, logits=True)  # type: ignore[attr-defined]

    def forward(
        self,
        batch: MultimodalBatch,
        modalities: Sequence[str] | None = None,
        orders: Sequence[Sequence[str]] | None = None,
        with_unimodal: bool = False,
        align_loss: bool = False,
    ) -> ModelOutput:
        """Encode and fuse a batch; see :meth:`fuse` for ``modalities`` and ``orders``."""
        z = self.encode(batch, modalities)
        out = self.fuse(z, batch.present, modalities=list(z), orders=orders, align_loss=align_loss)
        unimodal = self.fusion.unimodal_logits(z) if with_unimodal else None
        return ModelOutput(
            logits=out.logits, unimodal_logits=unimodal, features=z, aux_losses=out.aux_losses
        )

    def _check(self, modalities: Sequence[str] | None) -> list[str]:
        if modalities is None:
            return list(self.modalities)
        unknown = [m for m in modalities if m not in self.modalities]
        if unknown:
            raise KeyError(
                f"unknown modality {unknown[0]!r}; the model has {list(self.modalities)}"
            )
        # keep dataset order for order-free fusions; the memory reads `orders` anyway
        return [m for m in self.modalities if m in set(modalities)]
