"""Checkpoints as one safetensors file each: tensors plus JSON metadata, no pickle.

Loading never executes code from the file: tensors are read by safetensors and everything
else is JSON. Model, optimizer and strategy state all fit in that format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from equimodal.core.files import dumps_json, write_bytes_atomic

FORMAT = "equimodal-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def _flatten_optimizer(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        plain_entry = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{idx}/{key}"] = value.detach().cpu().contiguous()
            else:
                plain_entry[key] = value
        plain["state"][str(idx)] = plain_entry
    return plain


def _unflatten_optimizer(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in plain["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, idx, key = name.split("/", 2)
            state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Write model (and optimizer) tensors plus JSON ``meta`` atomically to ``path``."""
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "meta": meta}
    if optimizer is not None:
        header["optimizer"] = _flatten_optimizer(optimizer.state_dict(), tensors)
    data = st_save(tensors, metadata={"equimodal": dumps_json(header)})
    write_bytes_atomic(path, data)


def read_checkpoint(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """Read ``(model_state, meta, optimizer_state)``; CheckpointError names what is wrong."""
    p = Path(path)
    if p.exists() and not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} is not a file")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    raw = p.read_bytes()
    kind = _pickle_kind(raw)
    if kind is not None:
        raise CheckpointError(
            f"checkpoint {str(p)!r} is a {kind}, not safetensors; equimodal never unpickles "
            "a checkpoint (unpickling can run code from the file)"
        )
    try:
        tensors = st_load(raw)
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as handle:
            header_text = (handle.metadata() or {}).get("equimodal")
    except (SafetensorError, ValueError, OSError) as err:
        raise CheckpointError(
            f"checkpoint {str(p)!r} is not a readable safetensors file ({err})"
        ) from None
    if not header_text:
        raise CheckpointError(f"checkpoint {str(p)!r} has no equimodal metadata")
    try:
        header = json.loads(header_text)
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {str(p)!r} has corrupt metadata") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint {str(p)!r} has corrupt metadata (not a mapping)")
    if header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(p)!r} is not an equimodal checkpoint")
    if header.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(p)!r} has format version {header.get('version')}, "
            f"this equimodal reads version {FORMAT_VERSION}"
        )
    model_state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {str(p)!r} has corrupt metadata ('meta')")
    optim = header.get("optimizer")
    try:
        optim_state = _unflatten_optimizer(optim, tensors) if optim is not None else None
    except (AttributeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"checkpoint {str(p)!r} has a corrupt optimizer state") from None
    return model_state, meta, optim_state


def _pickle_kind(raw: bytes) -> str | None:
    """What pickle-based format ``raw`` is in (``torch.save`` zip, plain pickle), or None.

    A safetensors file starts with an 8-byte header length and then ``{``; anything that
    looks like that is left to the safetensors reader.
    """
    if len(raw) > 8 and raw[8:9] == b"{":
        return None
    if raw.startswith(b"PK\x03\x04"):
        return "zip archive (torch.save)"
    if len(raw) > 1 and raw[0] == 0x80 and 2 <= raw[1] <= 5:
        return "pickle file"
    return None


#: parameter names a checkpoint may lack; the model's initial value is kept
OPTIONAL_TENSORS = ("missing",)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly; CheckpointError names the first mismatch."""
    expected = model.state_dict()
    state = dict(state)
    for key, value in expected.items():
        # tensors added after a checkpoint format was written, whose initial value is
        # the old behaviour (e.g. concat's missing embedding, zeros = zero-filling)
        if key not in state and key.rsplit(".", 1)[-1] in OPTIONAL_TENSORS:
            state[key] = value.detach().clone()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise CheckpointError(f"checkpoint {source!r} does not fit this model: {what}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"checkpoint {source!r} does not fit this model: {k!r} has shape "
                f"{tuple(state[k].shape)}, the model needs {tuple(v.shape)}"
            )
    model.load_state_dict(state)
