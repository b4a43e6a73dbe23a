"""Building a run's parts from its config: device, seeds, model, optimizer, schedule.

Also the random-state capture and restore that exact resume needs, and the library
versions recorded with every run.
"""

from __future__ import annotations

import base64
import platform
import random
from typing import Any

import numpy as np
import torch

import equimodal
from equimodal.config import RunConfig
from equimodal.data.base import DatasetInfo
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


def build_model(config: RunConfig, info: DatasetInfo) -> MultimodalModel:
    """The model a config describes, for the modalities of ``info``."""
    mc = config.model
    unknown = [m for m in mc.encoders if m not in info.modality_names]
    if unknown:
        raise ValueError(
            f"model.encoders names modality {unknown[0]!r}, which dataset {info.name!r} lacks "
            f"(it has {', '.join(info.modality_names)})"
        )
    encoders = {
        spec.name: (enc.kind, enc.options())
        for spec in info.modalities
        for enc in [mc.encoders.get(spec.name, mc.encoder)]
    }
    fusion_options = mc.memory.model_dump() if mc.fusion == "memory" else {}
    return MultimodalModel(
        info.modalities,
        info.num_classes,
        dim=mc.dim,
        fusion=mc.fusion or "concat",
        encoders=encoders,
        fusion_options=fusion_options,
    )


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
