"""Building a run's parts from its config: device, seeds, model, optimizer, schedule.

Also the random-state capture and restore that exact resume needs, and the library
versions recorded with every run.
"""

from __future__ import annotations

import base64
import platform
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

import equimodal
from equimodal.config import RunConfig
from equimodal.core.registries import DATASETS, ENCODERS, FUSIONS, STRATEGIES
from equimodal.data.base import DatasetInfo
from equimodal.models.encoders import USER_MODULE_KIND
from equimodal.models.model import MultimodalModel


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but CUDA is not available on this machine")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; make torch kernels deterministic when asked."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's (CPU, CUDA) random states as JSON-serialisable data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    if torch.cuda.is_available():
        state["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode("ascii")
            for s in torch.cuda.get_rng_state_all()
        ]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""

    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(t) for t in state["cuda"]])


def build_model(
    config: RunConfig, info: DatasetInfo, modules: Mapping[str, nn.Module] | None = None
) -> MultimodalModel:
    """The model a config describes, for the modalities of ``info``.

    ``modules`` are the user's own encoders by modality (the config records them with
    kind ``module``, see :func:`record_user_modules`).
    """
    mc = config.model
    modules = dict(modules or {})
    unknown = [m for m in modules if m not in info.modality_names]
    if unknown:
        raise ValueError(
            f"encoders names modality {unknown[0]!r}, which dataset {info.name!r} lacks "
            f"(it has {', '.join(info.modality_names)})"
        )
    unknown = [m for m in mc.encoders if m not in info.modality_names]
    if unknown:
        raise ValueError(
            f"model.encoders names modality {unknown[0]!r}, which dataset {info.name!r} lacks "
            f"(it has {', '.join(info.modality_names)})"
        )
    encoders: dict[str, tuple[str, dict[str, Any]] | nn.Module] = {
        spec.name: (enc.kind, enc.options())
        for spec in info.modalities
        for enc in [mc.encoders.get(spec.name, mc.encoder)]
    }
    encoders.update(modules)
    fusion_options = mc.memory.model_dump() if mc.fusion == "memory" else {}
    return MultimodalModel(
        info.modalities,
        info.num_classes,
        dim=mc.dim,
        fusion=mc.fusion or "concat",
        encoders=encoders,
        fusion_options=fusion_options,
    )


def record_user_modules(config: RunConfig, modules: Mapping[str, nn.Module]) -> RunConfig:
    """``config`` with each of the user's ``modules`` recorded as an encoder of kind
    ``module`` (its class named), so the saved config says what a reload needs."""
    if not modules:
        return config
    encoders = {m: e.model_dump() for m, e in config.model.encoders.items()}
    for m, module in modules.items():
        cls = type(module)
        encoders[m] = {"kind": USER_MODULE_KIND, "cls": f"{cls.__module__}.{cls.__qualname__}"}
    tree = config.model_dump(mode="json")
    tree["model"]["encoders"] = encoders
    return RunConfig.model_validate(tree)


def build_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``config.optim`` over all model parameters."""
    oc = config.optim
    params = list(model.parameters())
    if oc.name in ("adamw", "adam"):
        kind = torch.optim.AdamW if oc.name == "adamw" else torch.optim.Adam
        if oc.fused:
            try:
                return kind(params, lr=oc.lr, weight_decay=oc.weight_decay, fused=True)
            except (RuntimeError, ValueError, TypeError):
                pass  # this torch or device has no fused kernel: the loop implementation
        return kind(params, lr=oc.lr, weight_decay=oc.weight_decay)
    return torch.optim.SGD(params, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay)


def build_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer):
    """The per-epoch learning-rate schedule of ``config.optim`` (None for ``none``)."""
    oc = config.optim
    if oc.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.train.epochs)
    if oc.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=oc.step_size, gamma=oc.gamma)
    return None


def library_versions() -> dict[str, str]:
    """Versions recorded with every run."""
    return {
        "equimodal": equimodal.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _defining_module(obj: Any) -> str | None:
    for attr in ("build", "loader"):  # an EncoderKind, a DatasetEntry
        obj = getattr(obj, attr, obj)
    return getattr(obj, "__module__", None)


def plugin_modules(config: RunConfig) -> tuple[list[str], list[str]]:
    """Where the non-built-in parts a run uses were registered.

    Returns ``(modules, from_scripts)``: the importable modules (not equimodal's own) that
    registered the run's encoder kinds, fusion, strategy or dataset, which a saved config
    lists under ``imports`` so that ``equimodal evaluate`` rebuilds the run; and a
    description of each part registered in a script (``__main__``), which nothing can
    import again.
    """
    mc = config.model
    used = [("encoder", ENCODERS, e.kind) for e in [mc.encoder, *mc.encoders.values()]]
    used += [("fusion", FUSIONS, mc.fusion), ("strategy", STRATEGIES, config.strategy.name)]
    if config.dataset.name in DATASETS:
        used.append(("dataset", DATASETS, config.dataset.name))
    modules: list[str] = []
    scripts: list[str] = []
    for what, registry, name in used:
        if name is None or name not in registry:
            continue
        module = _defining_module(registry.get(name))
        if module is None or module == "equimodal" or module.startswith("equimodal."):
            continue
        if module == "__main__":
            scripts.append(f"{what} {name!r}")
        elif module not in modules:
            modules.append(module)
    return modules, scripts
