"""Standard backbones from torchvision and timm as encoders (``kind: torchvision`` / ``timm``).

``name`` picks the architecture: a classification model of ``torchvision.models``
(``resnet18``, ``efficientnet_b0``, ...) or any ``timm.list_models()`` name. The networks
are built untrained; ``weights`` loads a **local** state_dict file (``.safetensors``, or a
``.pth`` read with ``torch.load(weights_only=True)``) whose key names are the library's own
(``model.state_dict()``). Nothing is ever downloaded.

The classifier is removed (torchvision: its last ``nn.Linear`` becomes ``nn.Identity``;
timm: ``num_classes=0``), so the encoder returns the pooled features and ``out_dim`` is
the backbone's feature width. A 1-channel spectrogram gets a 1-channel first convolution;
3-channel weights from a file are adapted to it by summing the kernels over the RGB
channels, as timm's ``adapt_input_conv`` does, which computes exactly what the RGB network
computes on the spectrogram copied into three channels. Frames ``(T, C, H, W)`` are
encoded one by one and the features averaged (or maxed) over time, as the ``resnet18``
encoder does.

torchvision and timm are imported when such an encoder is built, never on import of
equimodal.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from equimodal.data.base import ModalitySpec
from equimodal.models.encoders import register_encoder
from equimodal.models.resnet import FrameEncoder, input_channels, read_weights_file

TORCHVISION_INSTALL_HINT = "pip install 'equimodal[vision]'"
TIMM_INSTALL_HINT = "pip install 'equimodal[timm]'"

#: constructor arguments equimodal sets itself: weights come only from the ``weights`` file
RESERVED_MODEL_ARGS = frozenset(
    {
        "pretrained",
        "weights",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "checkpoint_path",
        "num_classes",
        "in_chans",
        "progress",
    }
)


class BackboneEncoder(FrameEncoder):
    """A torchvision or timm network without its classifier, as a modality encoder.

    Takes images or spectrograms ``(B, C, H, W)``, 1-channel spectrograms ``(B, F, T)``
    and frames ``(B, T, C, H, W)`` (each frame encoded, the features pooled over ``T``
    with ``frame_pool``); returns ``(B, out_dim)``. ``freeze`` keeps every parameter and
    the batch-norm statistics fixed (the module stays in eval mode).
    """

    def __init__(
        self,
        backbone: nn.Module,
        out_dim: int,
        in_channels: int,
        label: str,
        frame_pool: str = "mean",
    ) -> None:
        super().__init__()
        self.check_frame_pool(frame_pool)
        self.backbone = backbone
        self.out_dim = int(out_dim)
        self.in_channels = int(in_channels)
        #: ``torchvision:resnet18`` or ``timm:<name>``, for messages
        self.label = label
        self.frame_pool = frame_pool
        self.frozen = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, out_dim)``: the backbone without its classifier."""
        out = self.backbone(x)
        if not isinstance(out, torch.Tensor):  # googlenet / inception outputs in training
            out = out.logits if hasattr(out, "logits") else out[0]
        return out.reshape(out.shape[0], -1)


class BackboneOptions(BaseModel):
    """Options of the ``torchvision`` and ``timm`` encoders."""

    model_config = ConfigDict(extra="forbid")

    #: the architecture: ``resnet18``, ``efficientnet_b0``, any name the library lists
    name: str = Field(min_length=1)
    #: a local ``.safetensors`` / ``.pth`` state_dict in the library's key names (None:
    #: random initialisation); never downloaded
    weights: str | None = None
    #: input channels; default from the modality: 1 for a spectrogram, 3 for RGB frames
    in_channels: int | None = Field(None, gt=0)
    #: how per-frame features are pooled over time
    frame_pool: Literal["mean", "max"] = "mean"
    #: keep the (loaded) weights and batch-norm statistics fixed
    freeze: bool = False
    #: further keyword arguments of the model constructor (``drop_path_rate: 0.1``)
    model_args: dict[str, Any] = {}

    @field_validator("model_args")
    @classmethod
    def _no_weight_arguments(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(RESERVED_MODEL_ARGS.intersection(value))
        if reserved:
            raise ValueError(
                f"model_args may not set {', '.join(reserved)}: equimodal sets them (weights "
                "come only from a local file, through the weights option)"
            )
        return value


# --------------------------------------------------------------------------- helpers
def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _import_library(module: str, encoder: str, hint: str) -> ModuleType:
    """Import ``module`` or raise a one-line ImportError with the pip install ``hint``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        if (err.name or "").split(".")[0] == top:
            raise ImportError(f"the {encoder} encoder needs {top}: {hint}") from None
        raise ImportError(
            f"the {encoder} encoder cannot import {top}: {_first_line(err)}; {hint}"
        ) from None
    except Exception as err:  # e.g. a torchvision built for another torch release
        raise ImportError(
            f"the {encoder} encoder cannot import {module.split('.')[0]}: {_first_line(err)}; "
            f"it needs the torchvision release made for torch {torch.__version__} ({hint})"
        ) from None


def _unknown_name(encoder: str, name: str, choices: list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"see {where}"
    return ValueError(f"unknown {encoder} model {name!r}; {hint}")


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def load_backbone_weights(
    model: nn.Module, path: str | Path, label: str, classifier: tuple[str, ...] = ()
) -> None:
    """Load the state_dict file ``path`` into ``model`` (strict, one-line errors).

    Keys under the ``classifier`` prefixes (the removed head) are ignored. A first
    convolution saved for 3 channels is summed over them when the model reads 1 (timm's
    ``adapt_input_conv``); every other difference of keys or shapes is an error naming
    the file.
    """
    what = f"{label} weights file"
    where = f"{what} {str(path)!r}"
    state = read_weights_file(path, what)
    expected = model.state_dict()
    head = tuple(f"{prefix}." for prefix in classifier if prefix)
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(head)}
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"lacks {missing[0]!r} ({len(missing)} keys missing)")
        if unexpected:
            parts.append(f"has unexpected key {unexpected[0]!r} ({len(unexpected)} in all)")
        raise ValueError(
            f"{where} {' and '.join(parts)}; expected a {label} state_dict "
            "(the key names of the library's model.state_dict())"
        )
    for key, value in list(state.items()):
        want = tuple(expected[key].shape)
        if tuple(value.shape) == want:
            continue
        rgb_to_mono = (
            value.dim() == 4 and len(want) == 4 and value.shape[1] == 3 and want[1] == 1
        ) and (value.shape[0], *value.shape[2:]) == (want[0], *want[2:])
        if not rgb_to_mono:
            raise ValueError(
                f"{where}: {key!r} has shape {tuple(value.shape)}, the encoder needs {want}"
            )
        state[key] = value.sum(dim=1, keepdim=True)
    model.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- torchvision
def _torchvision_backbone(
    name: str, channels: int, model_args: dict[str, Any]
) -> tuple[nn.Module, int, tuple[str, ...]]:
    models = _import_library("torchvision.models", "torchvision", TORCHVISION_INSTALL_HINT)
    choices = list(models.list_models(module=models))  # classification models only
    if name not in choices:
        raise _unknown_name(
            "torchvision", name, choices, "torchvision.models.list_models(module=models)"
        )
    try:
        model = models.get_model(name, weights=None, **model_args)
    except TypeError as err:
        raise ValueError(f"torchvision model {name!r}: {_first_line(err)}") from None
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"torchvision model {name!r} has no linear classifier to remove; choose another "
            "model or the timm encoder"
        )
    head, last = linears[-1]
    _replace_module(model, head, nn.Identity())
    if channels != 3:
        _set_input_channels(model, name, channels)
    return model, int(last.in_features), (head,)


def _set_input_channels(model: nn.Module, name: str, channels: int) -> None:
    """Give the first 3-channel convolution of ``model`` ``channels`` inputs."""
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first[1].in_channels != 3:
        raise ValueError(
            f"torchvision model {name!r}: cannot find its first RGB convolution to read "
            f"{channels} channels"
        )
    conv_name, conv = first
    new = nn.Conv2d(
        channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():  # keep the model's own initialisation where it fits
        if channels < 3:
            new.weight.copy_(conv.weight[:, :channels])
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    _replace_module(model, conv_name, new)


# --------------------------------------------------------------------------- timm
def _timm_backbone(
    name: str, channels: int, model_args: dict[str, Any]
) -> tuple[nn.Module, int, tuple[str, ...]]:
    timm = _import_library("timm", "timm", TIMM_INSTALL_HINT)
    if not timm.is_model(name):
        raise _unknown_name("timm", name, list(timm.list_models()), "timm.list_models()")
    try:
        model = timm.create_model(
            name, pretrained=False, num_classes=0, in_chans=channels, **model_args
        )
    except TypeError as err:
        raise ValueError(f"timm model {name!r}: {_first_line(err)}") from None
    width = getattr(model, "head_hidden_size", None) or model.num_features
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return model, int(width), classifier


# --------------------------------------------------------------------------- builders
def _build_backbone(
    library: str,
    spec: ModalitySpec,
    name: str,
    weights: str | None,
    in_channels: int | None,
    frame_pool: str,
    freeze: bool,
    model_args: dict[str, Any],
) -> BackboneEncoder:
    channels = input_channels(spec, library, in_channels)
    make = _torchvision_backbone if library == "torchvision" else _timm_backbone
    backbone, width, classifier = make(name, channels, dict(model_args))
    label = f"{library}:{name}"
    if weights is not None:
        load_backbone_weights(backbone, weights, f"{library} {name}", classifier)
    encoder = BackboneEncoder(backbone, width, channels, label, frame_pool)
    if freeze:
        encoder.freeze()
    return encoder


@register_encoder(
    "torchvision",
    BackboneOptions,
    "a torchvision classification model by name (resnet18, ...), classifier removed; "
    "weights from a local file only",
)
def build_torchvision(spec: ModalitySpec, **options: Any) -> BackboneEncoder:
    """The torchvision model ``options['name']`` as an encoder of modality ``spec``."""
    return _build_backbone("torchvision", spec, **options)


@register_encoder(
    "timm",
    BackboneOptions,
    "a timm model by name (any timm.list_models() name), classifier removed; "
    "weights from a local file only",
)
def build_timm(spec: ModalitySpec, **options: Any) -> BackboneEncoder:
    """The timm model ``options['name']`` as an encoder of modality ``spec``."""
    return _build_backbone("timm", spec, **options)
