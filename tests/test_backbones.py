"""The torchvision and timm encoder kinds: building, shapes, local weights, errors, training.

The weights loading, the wrapper (frames pooling, freezing) and the missing-library
errors are tested everywhere; what needs timm or torchvision themselves is skipped where
they cannot be imported (a torchvision that does not match the installed torch raises on
import, and timm imports torchvision).
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch
from torch import nn

from equimodal.config import build_config
from equimodal.data.base import DatasetInfo, ModalitySpec
from equimodal.data.splits import build_data
from equimodal.models.backbones import (
    BackboneEncoder,
    load_backbone_weights,
    read_weights_file,
)
from equimodal.models.encoders import build_encoder
from equimodal.models.resnet import ResNet18

AUDIO = ModalitySpec("audio", (1, 64, 48), "spectrogram")
FRAMES = ModalitySpec("visual", (2, 3, 32, 32), "frames")


def import_or_skip(name: str):
    """The module ``name``, or skip the test when importing it fails in any way."""
    try:
        return importlib.import_module(name)
    except Exception as err:  # a torchvision built for another torch raises RuntimeError
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        pytest.skip(f"{name} cannot be imported: {reason}")


def tiny_backbone(channels: int = 3) -> nn.Module:
    """A small conv net with a linear head named ``fc``, like torchvision's ResNets."""
    net = nn.Sequential()
    net.add_module("conv1", nn.Conv2d(channels, 4, 3, padding=1, bias=False))
    net.add_module("bn1", nn.BatchNorm2d(4))
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flatten", nn.Flatten())
    net.add_module("fc", nn.Linear(4, 10))
    return net


def random_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state_dict with fresh random values (positive variances, counters kept)."""
    gen = torch.Generator().manual_seed(1)
    state = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            state[key] = value.clone()
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        else:
            state[key] = 0.1 * torch.randn(value.shape, generator=gen)
    return state


# --------------------------------------------------------------------------- everywhere
def test_wrapper_reads_spectrograms_images_and_pools_frames():
    backbone = tiny_backbone()
    backbone.fc = nn.Identity()
    visual = BackboneEncoder(backbone, 4, 3, "tiny", frame_pool="mean").eval()
    x = torch.randn(2, 3, 3, 16, 16)
    per_frame = visual.features(x.flatten(0, 1)).view(2, 3, 4)
    torch.testing.assert_close(visual(x), per_frame.mean(1))
    visual.frame_pool = "max"
    torch.testing.assert_close(visual(x), per_frame.amax(1))
    assert visual(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    with pytest.raises(ValueError, match="built for 3 input channels"):
        visual(torch.randn(2, 1, 16, 16))
    mono_net = tiny_backbone(1)
    mono_net.fc = nn.Identity()
    mono = BackboneEncoder(mono_net, 4, 1, "tiny")
    assert mono(torch.randn(2, 20, 12)).shape == (2, 4)  # (B, F, T) spectrogram
    mono.freeze()
    mono.train()
    assert not mono.training and not any(p.requires_grad for p in mono.parameters())


def test_weights_load_strictly_and_ignore_the_classifier(tmp_path):
    from safetensors.torch import save_file

    state = random_state(tiny_backbone())
    torch.save(state, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    for name in ("w.pth", "w.safetensors"):
        model = tiny_backbone()
        model.fc = nn.Identity()  # the head is gone: its keys in the file are skipped
        load_backbone_weights(model, tmp_path / name, "tiny", classifier=("fc",))
        torch.testing.assert_close(model.conv1.weight, state["conv1.weight"])
        torch.testing.assert_close(model.bn1.running_var, state["bn1.running_var"])
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "dp.pth")
    assert set(read_weights_file(tmp_path / "dp.pth", "tiny weights file")) == set(state)


def test_rgb_weights_are_summed_for_one_channel(tmp_path):
    state = random_state(tiny_backbone(3))
    torch.save(state, tmp_path / "rgb.pth")
    mono = tiny_backbone(1)
    load_backbone_weights(mono, tmp_path / "rgb.pth", "tiny")
    torch.testing.assert_close(mono.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    rgb = tiny_backbone(3)
    rgb.load_state_dict(state)
    mono.eval(), rgb.eval()
    x = torch.randn(2, 1, 8, 8)  # the summed kernel on x == the RGB net on x copied 3 times
    torch.testing.assert_close(mono(x), rgb(x.expand(-1, 3, -1, -1)))


def test_bad_weights_files_are_one_line_errors_naming_the_file(tmp_path):
    state = random_state(tiny_backbone())
    bad = dict(state)
    bad["extra.weight"] = bad.pop("bn1.weight")
    torch.save(bad, tmp_path / "wrong_keys.pth")
    with pytest.raises(ValueError, match="wrong_keys.pth") as err:
        load_backbone_weights(tiny_backbone(), tmp_path / "wrong_keys.pth", "timm test_resnet")
    message = str(err.value)
    assert "\n" not in message and "'bn1.weight'" in message and "'extra.weight'" in message
    assert "timm test_resnet state_dict" in message
    wide = dict(state, **{"conv1.weight": torch.randn(4, 3, 5, 5)})
    torch.save(wide, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape.pth.*'conv1\.weight' has shape \(4, 3, 5, 5\)"):
        load_backbone_weights(tiny_backbone(), tmp_path / "shape.pth", "tiny")
    torch.save({"net": nn.Linear(2, 2)}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="refusing .*pickled.pth"):
        load_backbone_weights(tiny_backbone(), tmp_path / "pickled.pth", "tiny")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read .*junk.safetensors"):
        load_backbone_weights(tiny_backbone(), tmp_path / "junk.safetensors", "tiny")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_backbone_weights(tiny_backbone(), tmp_path / "missing.pth", "tiny")


@pytest.mark.parametrize(
    ("kind", "module", "extra"),
    [("timm", "timm", "timm"), ("torchvision", "torchvision", "vision")],
)
def test_missing_library_names_the_extra(monkeypatch, kind, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails
    with pytest.raises(ImportError, match=rf"pip install 'equimodal\[{extra}\]'") as err:
        build_encoder(AUDIO, kind, name="resnet18")
    assert "\n" not in str(err.value)


def test_library_that_fails_to_import_is_one_line(monkeypatch):
    real = importlib.import_module

    def broken(name: str, package: str | None = None):
        if name.startswith("torchvision"):
            raise RuntimeError("operator torchvision::nms does not exist\nmore detail")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ImportError, match=r"torchvision::nms does not exist; .*vision\]'\)$"):
        build_encoder(FRAMES, "torchvision", name="resnet18")


def test_options_are_checked_by_the_config():
    config = build_config(
        {"model": {"encoders": {"audio": {"kind": "timm", "name": "resnet18", "in_channels": 1}}}}
    )
    assert config.model.encoders["audio"].options()["name"] == "resnet18"
    with pytest.raises(ValueError, match="name"):
        build_config({"model": {"encoders": {"audio": {"kind": "timm"}}}})
    with pytest.raises(ValueError, match="pretrained"):
        build_config(
            {
                "model": {
                    "encoders": {
                        "audio": {"kind": "timm", "name": "x", "model_args": {"pretrained": True}}
                    }
                }
            }
        )
    with pytest.raises(ValueError, match="reads spectrograms"):
        build_encoder(ModalitySpec("x", (10,), "features"), "timm", name="resnet18")


def test_library_and_model_in_one_kind():
    config = build_config(
        {"model": {"encoders": {"visual": {"kind": "torchvision:resnet18"}}}},
        ["model.encoder.kind=timm:resnet10t", "model.encoder.in_channels=1"],
    )
    visual = config.model.encoders["visual"]
    assert (visual.kind, visual.options()["name"]) == ("torchvision", "resnet18")
    assert (config.model.encoder.kind, config.model.encoder.options()["name"]) == (
        "timm",
        "resnet10t",
    )
    with pytest.raises(ValueError, match="names model 'resnet18' but name is 'vgg11'"):
        build_config({"model": {"encoder": {"kind": "torchvision:resnet18", "name": "vgg11"}}})
    with pytest.raises(ValueError, match="unknown encoder 'torchvison'"):
        build_config({"model": {"encoder": {"kind": "torchvison:resnet18"}}})


# --------------------------------------------------------------------------- with the libraries
LIBRARIES = [
    pytest.param("timm", "test_resnet", id="timm"),
    pytest.param("torchvision", "resnet18", id="torchvision"),
]


@pytest.mark.parametrize(("kind", "name"), LIBRARIES)
def test_shapes_out_dim_and_a_training_step(kind, name):
    import_or_skip(kind)
    torch.manual_seed(0)
    # timm zero-initialises each block's last norm, whose convolutions then get no gradient
    args = {"zero_init_last": False} if kind == "timm" else {}
    audio = build_encoder(AUDIO, kind, name=name, in_channels=1, model_args=args)
    visual = build_encoder(FRAMES, kind, name=name, frame_pool="max")
    width = 96 if kind == "timm" else 512
    assert audio.out_dim == visual.out_dim == width
    assert audio.in_channels == 1 and visual.in_channels == 3
    assert audio(torch.randn(2, 1, 64, 48)).shape == (2, width)
    assert audio(torch.randn(2, 64, 48)).shape == (2, width)
    assert visual(torch.randn(2, 2, 3, 32, 32)).shape == (2, width)
    before = [p.detach().clone() for p in audio.parameters()]
    optimizer = torch.optim.SGD(audio.parameters(), lr=0.1)
    audio(torch.randn(4, 1, 64, 48)).pow(2).mean().backward()
    optimizer.step()
    changed = [not torch.equal(a, p) for a, p in zip(before, audio.parameters(), strict=True)]
    assert all(changed)
    with pytest.raises(ValueError, match="in_channels is 3"):
        build_encoder(AUDIO, kind, name=name, in_channels=3)


@pytest.mark.parametrize(("kind", "name"), LIBRARIES)
def test_local_weights_load_into_the_library_model(kind, name, tmp_path):
    import_or_skip(kind)
    reference = build_encoder(FRAMES, kind, name=name).backbone
    state = random_state(reference)
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 3), torch.zeros(10)  # the head
    torch.save(state, tmp_path / "w.pth")
    visual = build_encoder(FRAMES, kind, name=name, weights=str(tmp_path / "w.pth"))
    for key, value in visual.backbone.state_dict().items():
        torch.testing.assert_close(value, state[key])
    audio = build_encoder(AUDIO, kind, name=name, weights=str(tmp_path / "w.pth"), freeze=True)
    mono, rgb = audio.backbone.state_dict(), visual.backbone.state_dict()
    first = next(k for k in mono if mono[k].shape != rgb[k].shape)  # the first conv
    torch.testing.assert_close(mono[first], rgb[first].sum(1, keepdim=True))
    x = torch.randn(2, 1, 64, 48)
    torch.testing.assert_close(audio(x), visual.eval()(x.expand(-1, 3, -1, -1)))
    del state[first]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=rf"broken.pth' lacks '{first}'.*{kind} {name} state"):
        build_encoder(FRAMES, kind, name=name, weights=str(tmp_path / "broken.pth"))


@pytest.mark.parametrize(
    ("kind", "typo", "close"),
    [("timm", "test_resnett", "test_resnet"), ("torchvision", "resnet81", "resnet18")],
)
def test_unknown_model_names_the_closest(kind, typo, close):
    import_or_skip(kind)
    with pytest.raises(ValueError, match=rf"unknown {kind} model '{typo}'; did you mean '{close}"):
        build_encoder(FRAMES, kind, name=typo)


def test_timm_sums_rgb_kernels_as_timm_does(tmp_path):
    timm = import_or_skip("timm")
    from timm.models import adapt_input_conv

    rgb = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    audio = build_encoder(AUDIO, "timm", name="test_resnet", weights=str(tmp_path / "rgb.pth"))
    key = next(k for k, v in audio.backbone.state_dict().items() if v.dim() == 4)
    torch.testing.assert_close(
        audio.backbone.state_dict()[key], adapt_input_conv(1, rgb.state_dict()[key])
    )


def test_shipped_resnet18_computes_what_torchvision_computes():
    """Same weights, same input: ours and torchvision's resnet18 agree (0.0 observed)."""
    torchvision = import_or_skip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0.0, 0.05)
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    ours = ResNet18(3)
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if "fc." not in k})
    reference.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 48)
    for train in (False, True):
        ours.train(train), reference.train(train)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-6)


def test_trainer_runs_end_to_end_with_a_timm_encoder():
    import_or_skip("timm")
    from equimodal.engine.trainer import Trainer

    rng = np.random.default_rng(0)
    n, classes = 48, 2
    labels = np.arange(n) % classes
    image = rng.normal(size=(n, 3, 16, 16)) + labels[:, None, None, None]
    spectrum = rng.normal(size=(n, 1, 16, 12)) - labels[:, None, None, None]
    info = DatasetInfo(
        name="tiny_images",
        modalities=(
            ModalitySpec("audio", (1, 16, 12), "spectrogram"),
            ModalitySpec("visual", (3, 16, 16), "image"),
        ),
        num_classes=classes,
        num_samples=n,
        source="generated by the test",
        license="n/a",
    )
    rows = {"train": np.arange(0, 32), "val": np.arange(32, 40), "test": np.arange(40, 48)}
    data = build_data(info, {"audio": spectrum, "visual": image}, labels, rows, standardize=False)
    encoder = {"kind": "timm", "name": "test_resnet"}
    config = build_config(
        {
            "dataset": {"name": "synthetic"},
            "strategy": {"name": "joint"},
            "model": {"dim": 8, "encoders": {"audio": encoder, "visual": encoder}},
            "train": {"epochs": 2, "batch_size": 16, "relative_edm": False},
        }
    )
    result = Trainer(config, data=data, progress=False).fit()
    assert result.metrics["test"]["num_samples"] == 8
    assert set(result.metrics["modalities"]) == {"audio", "visual"}
