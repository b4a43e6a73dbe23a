"""ResNet-18 encoder (``kind: resnet18``) for spectrograms, images and video frames.

An own implementation of the ResNet-18 of He et al. (CVPR 2016) whose parameter names and
shapes are those of torchvision's ``resnet18`` state_dict (``conv1``, ``bn1``,
``layer1.0.conv1``, ..., ``layer4.1.bn2``; the classifier ``fc`` is left out), so a local
torchvision weights file loads without torchvision. The audio-visual balance literature
(OGM-GE, AGM, MLA, BalanceBenchmark) uses two of these from scratch: one over a 1-channel
spectrogram, one over RGB frames, the frames encoded one by one and averaged over time.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from equimodal.data.base import ModalitySpec
from equimodal.models.encoders import register_encoder

LAYER_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class FrameEncoder(nn.Module):
    """Base of the convolutional encoders: images or spectrograms ``(B, C, H, W)``,
    1-channel spectrograms ``(B, F, T)`` and frames ``(B, T, C, H, W)`` (every frame
    through :meth:`features`, pooled over ``T`` by ``frame_pool``) to ``(B, out_dim)``.

    Subclasses set ``label`` (for messages), ``in_channels`` and ``frame_pool`` and define
    :meth:`features` ``(N, C, H, W) -> (N, out_dim)``. A frozen encoder keeps every
    parameter and the batch-norm statistics fixed (it stays in eval mode).
    """

    label = "encoder"
    in_channels: int
    frame_pool: str
    frozen = False

    @staticmethod
    def check_frame_pool(frame_pool: str) -> None:
        """ValueError unless ``frame_pool`` is ``mean`` or ``max``."""
        if frame_pool not in ("mean", "max"):
            raise ValueError(f"frame_pool must be 'mean' or 'max', got {frame_pool!r}")

    def freeze(self) -> None:
        """Fix every parameter and the batch-norm statistics."""
        self.frozen = True
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrameEncoder:
        """Set training mode; a frozen encoder stays in eval mode."""
        return super().train(mode and not self.frozen)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, out_dim)``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images or spectrograms ``(B, C, H, W)`` or frames ``(B, T, C, H, W)``."""
        if self.frozen:
            with torch.no_grad():
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and self.in_channels == 1:
            x = x.unsqueeze(1)
        if x.dim() == 4:
            self._check_channels(x.shape[1], x.shape)
            return self.features(x)
        if x.dim() == 5:
            b, t = x.shape[:2]
            self._check_channels(x.shape[2], x.shape)
            f = self.features(x.reshape(b * t, *x.shape[2:])).view(b, t, -1)
            return f.mean(1) if self.frame_pool == "mean" else f.amax(1)
        raise ValueError(
            f"{self.label} takes (B, C, H, W) images or spectrograms or (B, T, C, H, W) "
            f"frames, got shape {tuple(x.shape)}"
        )

    def _check_channels(self, channels: int, shape: torch.Size) -> None:
        if channels != self.in_channels:
            raise ValueError(
                f"{self.label} was built for {self.in_channels} input channels, got input "
                f"of shape {tuple(shape)}"
            )


class ResNet18(FrameEncoder):
    """ResNet-18 trunk with global average pooling: ``(B, C, H, W) -> (B, 512)``.

    Also takes frames ``(B, T, C, H, W)``: every frame goes through the 2-D network and
    the per-frame features are pooled over ``T`` (``frame_pool`` mean or max). A 3-D
    input ``(B, F, T)`` is read as a 1-channel spectrogram. ``freeze`` keeps every
    parameter and the batch-norm statistics fixed (the module stays in eval mode).
    """

    label = "resnet18"

    def __init__(
        self, in_channels: int = 3, frame_pool: str = "mean", freeze: bool = False
    ) -> None:
        super().__init__()
        if in_channels <= 0:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        self.check_frame_pool(frame_pool)
        self.in_channels = in_channels
        self.frame_pool = frame_pool
        self.out_dim = LAYER_WIDTHS[-1]
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, planes in enumerate(LAYER_WIDTHS):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes))
            self.add_module(f"layer{i + 1}", layer)
            inplanes = planes
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.frozen = False
        if freeze:
            self.freeze()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, 512)``: the trunk and global average pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def read_weights_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``.pth`` state_dict (never unpickles objects).

    ``what`` names the file in messages (``resnet18 weights file``). A ``.pth`` is read
    with ``torch.load(weights_only=True)``; a dict nested under ``state_dict`` or ``model``
    is unwrapped and a ``module.`` prefix (DataParallel) removed.
    """
    path = Path(path)
    where = f"{what} {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"refusing {where}: it holds Python objects besides tensors, and unpickling "
            "those can run code from the file; save a plain state_dict or a .safetensors file"
        ) from None
    except Exception as err:  # torch and safetensors raise various error types
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot read {where}: {reason}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where} does not hold a state_dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ResNet-18 weights file (:func:`read_weights_file`)."""
    return read_weights_file(path, "resnet18 weights file")


def load_resnet18_weights(model: ResNet18, path: str | Path) -> None:
    """Load torchvision-named ResNet-18 weights from ``path`` into ``model`` (``fc`` ignored).

    When the model reads 1 channel and the file's ``conv1`` has 3 (ImageNet weights on
    a spectrogram), ``conv1`` is summed over its input channels, as timm's
    ``adapt_input_conv`` and the ``torchvision``/``timm`` encoder kinds do: a grey image then
    gets exactly the RGB network's response, which the loaded batch-norm statistics expect.
    """
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("fc.")}
    expected = model.state_dict()
    where = f"resnet18 weights file {str(path)!r}"
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(
            f"{where} lacks {missing[0]!r} ({len(missing)} keys missing); expected a "
            "torchvision resnet18 state_dict"
        )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ValueError(
            f"{where} has unexpected key {unexpected[0]!r} ({len(unexpected)} in all); "
            "expected a torchvision resnet18 state_dict"
        )
    conv1 = state["conv1.weight"]
    if conv1.dim() == 4 and conv1.shape[1] != model.in_channels:
        if model.in_channels != 1:
            raise ValueError(
                f"{where}: conv1 reads {conv1.shape[1]} channels but the encoder reads "
                f"{model.in_channels}; only 3 -> 1 (summed) is adapted"
            )
        state["conv1.weight"] = conv1.sum(dim=1, keepdim=True)
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{where}: {key!r} has shape {tuple(value.shape)}, the encoder needs "
                f"{tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=False)


class ResNet18Options(BaseModel):
    """Options of the ``resnet18`` encoder."""

    model_config = ConfigDict(extra="forbid")

    #: input channels; default from the modality: 1 for a spectrogram, 3 for RGB frames
    in_channels: int | None = Field(None, gt=0)
    #: a local torchvision-named ``.pth`` / ``.safetensors`` state_dict (None: from scratch)
    weights: str | None = None
    #: how per-frame features are pooled over time
    frame_pool: Literal["mean", "max"] = "mean"
    #: keep the (loaded) weights and batch-norm statistics fixed
    freeze: bool = False


def input_channels(
    spec: ModalitySpec, encoder: str = "resnet18", declared: int | None = None
) -> int:
    """Channels of a modality's samples: ``(C, F, T)`` spectrograms, ``(T, C, H, W)`` frames.

    ``declared`` (an encoder's ``in_channels`` option) must match them when given;
    ``encoder`` names the encoder in the errors.
    """
    shape = tuple(spec.shape)
    if spec.kind == "frames" and len(shape) == 4:
        channels = int(shape[1])
    elif spec.kind in ("spectrogram", "image") and len(shape) == 3:
        channels = int(shape[0])
    elif spec.kind == "spectrogram" and len(shape) == 2:
        channels = 1
    else:
        raise ValueError(
            f"modality {spec.name!r}: the {encoder} encoder reads spectrograms (C, F, T), images "
            f"(C, H, W) or frames (T, C, H, W); got kind {spec.kind!r} with shape {shape}"
        )
    if declared is not None and declared != channels:
        raise ValueError(
            f"modality {spec.name!r}: {encoder} in_channels is {declared} but the samples "
            f"have {channels} channels (shape {shape})"
        )
    return channels


@register_encoder(
    "resnet18",
    ResNet18Options,
    "ResNet-18 over spectrograms, images or frames (pooled over time); torchvision names",
)
def build_resnet18(
    spec: ModalitySpec,
    in_channels: int | None = None,
    weights: str | None = None,
    frame_pool: str = "mean",
    freeze: bool = False,
) -> ResNet18:
    """A :class:`ResNet18` for modality ``spec``, optionally loaded from ``weights``."""
    channels = input_channels(spec, "resnet18", in_channels)
    model = ResNet18(channels, frame_pool=frame_pool)
    if weights is not None:
        load_resnet18_weights(model, weights)
    if freeze:
        model.freeze()
    return model
