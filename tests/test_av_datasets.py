"""CREMA-D and Kinetics-Sounds: media helpers, prepare steps, loaders, ResNet-18, end to end."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from equimodal.apps.cli import app
from equimodal.data.audio import fix_length, log_mel_fbank, log_stft, read_wav
from equimodal.data.base import ModalitySpec
from equimodal.data.frames import list_frames, load_frames, sample_frame_indices
from equimodal.data.registry import load_dataset
from equimodal.models.encoders import build_encoder
from equimodal.models.resnet import ResNet18, load_resnet18_weights

from .av_fixtures import (
    CREMAD_CLASSES,
    class_color,
    make_cremad_raw,
    make_kinetics_raw,
    make_video,
    write_jpg,
    write_wav,
)

pytest.importorskip("soundfile")
pytest.importorskip("PIL")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line(result) -> str:
    return " ".join(result.output.split())


def has_ffmpeg() -> bool:
    from equimodal.data.frames import find_ffmpeg

    try:
        find_ffmpeg()
    except FileNotFoundError:
        return False
    return True


needs_ffmpeg = pytest.mark.skipif(not has_ffmpeg(), reason="no ffmpeg (pip install imageio-ffmpeg)")
VIDEOS = 2 if has_ffmpeg() else 0
TINY_TRAIN = [
    "--epochs",
    "1",
    "-q",
    "--set",
    "dataset.options.frame_size=32",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.eval_batch_size=16",
    "--set",
    "model.dim=16",
    "--set",
    "train.relative_edm=false",
    "--set",
    "train.device=cpu",
    "--set",
    "dataset.options.num_workers=0",
]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cremad(tmp_path_factory):
    """(raw, prepared) CREMA-D fixture; 1 s of audio keeps the spectrograms small."""
    base = tmp_path_factory.mktemp("cremad")
    make_cremad_raw(base / "raw", videos=VIDEOS)
    result = invoke(
        "prepare", "cremad", "--raw", base / "raw", "--out", base / "root", "-q", "-o", "seconds=1"
    )
    assert result.exit_code == 0, result.output
    assert "24 items written" in result.output
    return base / "raw", base / "root"


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
    """(raw, prepared) Kinetics-Sounds fixture with 32 mel bins and 64 frames."""
    base = tmp_path_factory.mktemp("ks")
    make_kinetics_raw(base / "raw", n_mels=32, videos=VIDEOS)
    result = invoke(
        "prepare",
        "kinetics_sounds",
        "--raw",
        base / "raw",
        "--out",
        base / "root",
        "-q",
        "-o",
        "n_mels=32",
        "-o",
        "target_frames=64",
    )
    assert result.exit_code == 0, result.output
    assert "18 items written" in result.output
    return base / "raw", base / "root"


def copy_root(root: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(root, dest)
    return dest


# --------------------------------------------------------------------------- media
def test_spectrogram_shape_arithmetic():
    # OGM-GE's CREMA-D audio: 3 s at 22050 Hz, n_fft 512, hop 353 -> 257 x (1 + 66150 // 353)
    assert log_stft(np.zeros(66150, dtype=np.float32)).shape == (1, 257, 188)
    assert log_stft(np.zeros(48000, dtype=np.float32)).shape == (1, 257, 136)  # 16 kHz
    # Kaldi fbank: 25 ms frames every 10 ms without padding: 1 + (160000 - 400) // 160
    assert log_mel_fbank(np.zeros(160000, dtype=np.float32), 16000).shape == (1, 128, 998)


def test_fbank_peaks_at_the_tone_and_stft_is_log_magnitude():
    t = np.arange(16000) / 16000
    low = log_mel_fbank(np.sin(2 * np.pi * 300 * t), 16000, n_mels=64)[0].mean(1)
    high = log_mel_fbank(np.sin(2 * np.pi * 3000 * t), 16000, n_mels=64)[0].mean(1)
    assert int(low.argmax()) < int(high.argmax())
    spec = log_stft(np.zeros(1000))
    torch.testing.assert_close(spec, torch.full_like(spec, float(np.log(1e-7))))


def test_fix_length_tiles_short_clips_and_crops_long_ones():
    wave = np.arange(5, dtype=np.float32)
    assert fix_length(wave, 4, 3.0).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert fix_length(np.arange(20.0), 4, 1.0).tolist() == [0, 1, 2, 3]
    assert torch.equal(fix_length(torch.arange(3.0), 2, 2.0), torch.tensor([0.0, 1, 2, 0]))


def test_read_wav_averages_channels_and_names_bad_files(tmp_path):
    import soundfile

    stereo = np.stack([np.full(100, 0.5), np.full(100, -0.25)], 1).astype(np.float32)
    soundfile.write(tmp_path / "s.wav", stereo, 8000, subtype="FLOAT")
    wave, rate = read_wav(tmp_path / "s.wav")
    assert rate == 8000 and wave.dtype == np.float32 and wave.shape == (100,)
    np.testing.assert_allclose(wave, 0.125)
    (tmp_path / "bad.wav").write_bytes(b"not a wav")
    with pytest.raises(ValueError, match="bad.wav"):
        read_wav(tmp_path / "bad.wav")
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        read_wav(tmp_path / "nope.wav")


def test_sample_frame_indices():
    assert sample_frame_indices(9, 3, train=False) == [1, 4, 7]  # segment centres
    assert sample_frame_indices(2, 3, train=False) == [0, 0, 1]  # repeats when few
    for gen in (np.random.default_rng(0), torch.Generator().manual_seed(0)):
        for _ in range(20):
            picks = sample_frame_indices(10, 3, train=True, generator=gen)
            assert picks == sorted(picks)
            assert 0 <= picks[0] < 3 <= picks[1] < 6 <= picks[2] < 10
    with pytest.raises(ValueError):
        sample_frame_indices(0, 1, train=False)


def test_frames_are_read_in_natural_sorted_order(tmp_path):
    for index, name in ((1, "frame_1.jpg"), (2, "frame_2.jpg"), (3, "frame_10.jpg")):
        write_jpg(tmp_path / name, (60 * index, 60 * index, 60 * index))
    paths = list_frames(tmp_path)
    assert [p.name for p in paths] == ["frame_1.jpg", "frame_2.jpg", "frame_10.jpg"]
    x = load_frames(paths, size=16)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    means = x.mean(dim=(1, 2, 3))
    assert bool((means[1:] > means[:-1]).all())
    aug = load_frames(paths, size=16, augment=True, rng=np.random.default_rng(0))
    assert aug.shape == (3, 3, 16, 16)
    (tmp_path / "broken.jpg").write_bytes(b"no image")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_frames([tmp_path / "broken.jpg"])


@needs_ffmpeg
def test_extract_frames_names_and_count(tmp_path):
    from equimodal.data.frames import extract_frames

    make_video(tmp_path / "v.mp4", seconds=3.0)
    count = extract_frames(tmp_path / "v.mp4", tmp_path / "frames", fps=2, size=24)
    names = [p.name for p in list_frames(tmp_path / "frames")]
    assert count == len(names) >= 5 and names[0] == "frame_00000.jpg"
    assert not list(tmp_path.glob(".*partial"))
    from PIL import Image

    with Image.open(tmp_path / "frames" / names[0]) as img:
        assert min(img.size) == 24


# --------------------------------------------------------------------------- resnet18
EXPECTED_SHAPES = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.running_var": (64,),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer1.1.bn2.bias": (64,),
    "layer2.0.conv1.weight": (128, 64, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.0.downsample.1.running_mean": (128,),
    "layer3.1.conv2.weight": (256, 256, 3, 3),
    "layer4.0.downsample.0.weight": (512, 256, 1, 1),
    "layer4.1.bn2.weight": (512,),
}


def test_resnet18_state_dict_names_match_torchvision():
    state = ResNet18(3).state_dict()
    for key, shape in EXPECTED_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert len(state) == 120 and not any(k.startswith("fc.") for k in state)
    assert "layer1.0.downsample.0.weight" not in state
    # where torchvision imports, test_backbones.py loads torchvision's own resnet18
    # state dict strictly and compares outputs


def test_resnet18_loads_weights_and_sums_conv1(tmp_path):
    from safetensors.torch import save_file

    source = ResNet18(3)
    state = {k: v.clone() for k, v in source.state_dict().items() if "num_batches" not in k}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(state, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    for name in ("w.pth", "w.safetensors"):
        spec = ModalitySpec("audio", (1, 40, 30), "spectrogram")
        audio = build_encoder(spec, "resnet18", weights=str(tmp_path / name))
        torch.testing.assert_close(audio.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
        grey = torch.randn(2, 1, 40, 30)  # one channel = the RGB network on a grey image
        source.eval(), audio.eval()
        with torch.no_grad():
            torch.testing.assert_close(audio(grey), source(grey.expand(-1, 3, -1, -1)))
        torch.testing.assert_close(audio.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
        frames = build_encoder(
            ModalitySpec("visual", (2, 3, 32, 32), "frames"),
            "resnet18",
            weights=str(tmp_path / name),
        )
        torch.testing.assert_close(frames.conv1.weight, state["conv1.weight"])
    del state["layer2.0.bn1.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"layer2\.0\.bn1\.weight"):
        load_resnet18_weights(ResNet18(3), tmp_path / "broken.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_resnet18_weights(ResNet18(3), tmp_path / "missing.pth")


def test_resnet18_channels_pooling_and_freeze():
    spec = ModalitySpec("audio", (1, 40, 30), "spectrogram")
    audio = build_encoder(spec, "resnet18")
    assert audio.in_channels == 1 and audio.out_dim == 512
    assert audio(torch.randn(2, 1, 40, 30)).shape == (2, 512)
    with pytest.raises(ValueError, match="in_channels"):
        build_encoder(spec, "resnet18", in_channels=3)
    with pytest.raises(ValueError, match="spectrograms"):
        build_encoder(ModalitySpec("x", (10,), "features"), "resnet18")
    visual = build_encoder(ModalitySpec("visual", (3, 3, 32, 32), "frames"), "resnet18").eval()
    x = torch.randn(2, 3, 3, 32, 32)
    per_frame = visual.features(x.flatten(0, 1)).view(2, 3, 512)
    torch.testing.assert_close(visual(x), per_frame.mean(1))
    visual.frame_pool = "max"
    torch.testing.assert_close(visual(x), per_frame.amax(1))
    frozen = build_encoder(spec, "resnet18", freeze=True)
    frozen.train()
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert not frozen(torch.randn(2, 1, 40, 30)).requires_grad


# --------------------------------------------------------------------------- splits
def test_kinetics_split_formats(tmp_path):
    from equimodal.data.kinetics_sounds import _drop_header, class_ids, read_split_file

    (tmp_path / "ogm.txt").write_text("a_000001_000011,10,2\nb_000001_000011,10,0\n")
    (tmp_path / "bb.txt").write_text("name label\nc.mp4 10 1\n\nd 10 3\n")
    ogm = _drop_header(read_split_file(tmp_path / "ogm.txt"))
    bb = _drop_header(read_split_file(tmp_path / "bb.txt"))
    assert ogm[0] == ["a_000001_000011", "b_000001_000011"] and ogm[1] == ["2", "0"]
    assert bb[0] == ["c", "d"] and bb[1] == ["1", "3"]
    ids, names = class_ids({"train": ogm[1], "test": bb[1]}, "x", None)
    assert ids == {"train": [2, 0], "test": [1, 3]} and names == ("0", "1", "2", "3")
    (tmp_path / "classes.txt").write_text("w\nx\ny\nz\n")
    assert class_ids({"t": ["1"]}, "x", tmp_path / "classes.txt")[1] == ("w", "x", "y", "z")
    ids, names = class_ids({"train": ["dog", "cat"], "test": ["cat"]}, "x", None)
    assert names == ("cat", "dog") and ids == {"train": [1, 0], "test": [0]}
    with pytest.raises(ValueError, match="mix"):
        class_ids({"train": ["dog", "3"]}, "x", None)


def test_cremad_split_file_errors_name_the_line(tmp_path):
    from equimodal.data.cremad import read_split_file

    (tmp_path / "train.csv").write_text("\ufeff1001_DFA_ANG_XX,ANG\n1001_DFA_XXX_XX,XXX\n")
    with pytest.raises(ValueError, match="line 2"):
        read_split_file(tmp_path / "train.csv")


# --------------------------------------------------------------------------- cremad
def test_cremad_prepared_layout_and_rerun_skips_everything(cremad):
    raw, root = cremad
    meta = json.loads((root / "prepare.json").read_text())
    assert meta["settings"]["audio_shape"] == [1, 257, 1 + 22050 // 353]
    clips = [line.split(",")[0] for line in (root / "train.csv").read_text().splitlines()]
    assert len(clips) == 18
    spec = np.load(root / "audio" / f"{clips[0]}.npy")
    assert spec.shape == (1, 257, 63) and spec.dtype == np.float32
    if VIDEOS:
        video_clip = next((raw / "VideoFlash").iterdir()).stem
        assert [p.name for p in list_frames(root / "visual" / video_clip)][0] == "frame_00000.jpg"
    again = invoke("prepare", "cremad", "--raw", raw, "--out", root, "-q", "-o", "seconds=1")
    assert again.exit_code == 0 and "0 items written, 24 already prepared" in again.output


def test_cremad_train_end_to_end(cremad, tmp_path):
    _, root = cremad
    result = invoke(
        "train",
        "-c",
        CONFIGS / "cremad_shapley_alternating.yaml",
        "--out",
        tmp_path,
        "--name",
        "r",
        "--set",
        f"dataset.options.root={root}",
        "--set",
        "dataset.options.val_fraction=0.34",
        *TINY_TRAIN,
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["test"]["num_samples"] == 6
    assert set(metrics["modalities"]) == {"audio", "visual"}


def test_cremad_loader_reads_items_reproducibly(cremad):
    _, root = cremad
    data = load_dataset(
        "cremad",
        seed=0,
        root=str(root),
        frame_size=32,
        val_fraction=0.34,
        num_frames=2,
        audio_seconds=0.5,
    )
    audio, visual = data.info.modalities
    assert audio.shape == (1, 257, 1 + int(0.5 * 22050 / 353)) and audio.kind == "spectrogram"
    assert visual.shape == (2, 3, 32, 32) and visual.kind == "frames"
    assert (len(data.train), len(data.val), len(data.test)) == (11, 7, 6)
    first = next(data.train.batches(4))
    again = next(data.train.batches(4))
    assert first.inputs["audio"].shape == (4, *audio.shape)
    torch.testing.assert_close(first.inputs["audio"], again.inputs["audio"])
    # training frames are augmented differently on another pass, evaluation ones never
    assert not torch.equal(first.inputs["visual"], again.inputs["visual"])
    moved = data.train.to("cpu")  # the trainer's copy for a device keeps its own passes
    assert moved.read.split is moved and data.train.read.split is data.train
    assert not torch.equal(
        next(moved.batches(4)).inputs["visual"], next(moved.batches(4)).inputs["visual"]
    )
    v1, v2 = next(data.val.batches(4)), next(data.val.batches(4))
    torch.testing.assert_close(v1.inputs["visual"], v2.inputs["visual"])
    with pytest.raises(ValueError, match="audio_seconds"):
        load_dataset("cremad", root=str(root), audio_seconds=5.0)


def test_cremad_worker_processes_read_the_same_batches(cremad):
    _, root = cremad
    options = {"root": str(root), "frame_size": 16, "val_fraction": 0.34, "max_items": 12}
    plain = load_dataset("cremad", seed=1, num_workers=0, **options)
    workers = load_dataset("cremad", seed=1, num_workers=2, **options)
    passes = []
    for _ in range(3):  # the workers persist: each pass still gets its own augmentation
        got = []
        for a, b in zip(plain.train.batches(6), workers.train.batches(6), strict=True):
            assert torch.equal(a.indices, b.indices)
            torch.testing.assert_close(a.inputs["visual"], b.inputs["visual"])
            got.append(b.inputs["visual"])
        passes.append(torch.cat(got))
    assert not torch.equal(passes[0], passes[1])  # a new random crop per pass
    loader = workers.train._data_loader()
    assert loader.persistent_workers and loader.num_workers == 2
    assert workers.train._data_loader() is loader  # one loader, reused across passes


def test_loader_workers_default_to_what_the_machine_suits(monkeypatch):
    from equimodal.data.items import default_workers

    monkeypatch.setenv("EQUIMODAL_NUM_WORKERS", "3")
    assert default_workers() == 3
    monkeypatch.setenv("EQUIMODAL_NUM_WORKERS", "many")
    with pytest.raises(ValueError, match="EQUIMODAL_NUM_WORKERS must be an integer"):
        default_workers()
    monkeypatch.delenv("EQUIMODAL_NUM_WORKERS")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert default_workers() == 0  # 2 cores: workers would compete with training
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_workers() == 4
    from equimodal.data.loaders import check_workers

    for bad in (-1, "all", True):
        with pytest.raises(ValueError, match="num_workers must be 'auto' or an integer"):
            check_workers(bad)


def test_missing_files_are_one_error_with_the_first_and_the_count(cremad, tmp_path):
    _, root = cremad
    copy = copy_root(root, tmp_path)
    clips = [line.split(",")[0] for line in (copy / "train.csv").read_text().splitlines()]
    (copy / "audio" / f"{clips[1]}.npy").unlink()
    (copy / "audio" / f"{clips[4]}.npy").unlink()
    shutil.rmtree(copy / "visual" / clips[4])
    result = invoke(
        "train",
        "--dataset",
        "cremad",
        "--out",
        tmp_path / "runs",
        "--set",
        f"dataset.options.root={copy}",
        *TINY_TRAIN,
        "--set",
        "dataset.options.num_workers=2",
    )
    assert result.exit_code == 2
    text = one_line(result)
    assert "3 files" in text and f"{clips[1]}.npy" in text and "equimodal prepare cremad" in text
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()


def test_root_option_is_required_and_must_be_prepared(cremad, tmp_path):
    raw, _ = cremad
    result = invoke("train", "--dataset", "cremad", "--out", tmp_path / "runs", "-q")
    assert result.exit_code == 2
    assert "dataset.options.root" in one_line(result)
    assert "equimodal prepare cremad" in one_line(result)
    result = invoke(
        "train",
        "--dataset",
        "kinetics_sounds",
        "--out",
        tmp_path / "runs",
        "-q",
        "--set",
        f"dataset.options.root={raw}",
    )
    assert result.exit_code == 2 and "not a prepared kinetics_sounds folder" in one_line(result)


def test_partial_outputs_are_replaced(cremad, tmp_path):
    raw, root = cremad
    copy = copy_root(root, tmp_path)
    clips = [line.split(",")[0] for line in (copy / "train.csv").read_text().splitlines()]
    (copy / "audio" / f"{clips[0]}.npy").unlink()  # killed while writing audio ...
    (copy / "audio" / f".{clips[0]}.npy.partial").write_bytes(b"half")
    shutil.rmtree(copy / "visual" / clips[1])  # ... or frames
    (copy / "visual" / f".{clips[1]}.partial").mkdir()
    np.save(copy / "audio" / f"{clips[2]}.npy", np.zeros(3, dtype=np.float32))  # wrong shape
    result = invoke("prepare", "cremad", "--raw", raw, "--out", copy, "-q", "-o", "seconds=1")
    assert result.exit_code == 0, result.output
    assert "3 items written, 21 already prepared" in result.output
    assert not list(copy.rglob("*.partial"))
    assert np.load(copy / "audio" / f"{clips[2]}.npy").shape == (1, 257, 63)
    assert list_frames(copy / "visual" / clips[1])


def test_prepare_refuses_other_settings_and_bad_options(cremad, tmp_path):
    raw, root = cremad
    result = invoke("prepare", "cremad", "--raw", raw, "--out", root, "-q", "-o", "seconds=2")
    assert result.exit_code == 2 and "seconds=1.0" in one_line(result)
    result = invoke("prepare", "cremad", "--raw", raw, "--out", tmp_path, "-o", "fsp=2")
    assert result.exit_code == 2 and "did you mean 'fps'" in one_line(result)


def test_unreadable_items_are_left_out_of_the_split(tmp_path):
    clips = make_cremad_raw(tmp_path / "raw", train_per_class=1, test_per_class=1, videos=0)
    (tmp_path / "raw" / "AudioWAV" / f"{clips['train'][2]}.wav").write_bytes(b"broken")
    args = ["prepare", "cremad", "--raw", tmp_path / "raw", "-q", "-o", "seconds=0.5"]
    result = invoke(*args, "--out", tmp_path / "strict", "-o", "strict=true")
    assert result.exit_code == 2 and f"{clips['train'][2]}.wav" in one_line(result)
    result = invoke(*args, "--out", tmp_path / "root")
    assert result.exit_code == 0, result.output
    assert "1 of 12 items could not be prepared" in one_line(result)
    kept = (tmp_path / "root" / "train.csv").read_text()
    assert clips["train"][2] not in kept and clips["train"][3] in kept
    assert clips["train"][2] in (tmp_path / "root" / "left_out.txt").read_text()


def test_cremad_train_split_from_data_csv(tmp_path):
    clips = make_cremad_raw(tmp_path / "raw", train_per_class=1, test_per_class=1, videos=0)
    raw = tmp_path / "raw"
    (raw / "data.csv").write_text((raw / "train.csv").read_text() + (raw / "test.csv").read_text())
    (raw / "train.csv").unlink()
    result = invoke(
        "prepare", "cremad", "--raw", raw, "--out", tmp_path / "root", "-q", "-o", "seconds=0.5"
    )
    assert result.exit_code == 0 and "data.csv minus test.csv" in one_line(result)
    written = (tmp_path / "root" / "train.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in written] == clips["train"]


@needs_ffmpeg
def test_missing_ffmpeg_is_a_clear_error(tmp_path, monkeypatch):
    make_cremad_raw(tmp_path / "raw", train_per_class=1, test_per_class=1, videos=2)
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails
    result = invoke("prepare", "cremad", "--raw", tmp_path / "raw", "--out", tmp_path / "root")
    assert result.exit_code == 2
    text = one_line(result)
    assert "ffmpeg is needed" in text and "pip install imageio-ffmpeg" in text
    assert not (tmp_path / "root").exists()  # stopped before writing anything
    from equimodal.data.frames import extract_frames

    with pytest.raises(FileNotFoundError, match="ffmpeg"):
        extract_frames(next((tmp_path / "raw" / "VideoFlash").iterdir()), tmp_path / "f", 1, None)


# --------------------------------------------------------------------------- kinetics
def test_kinetics_prepared_layout(kinetics):
    raw, root = kinetics
    names = [line.split(",")[0] for line in (root / "train.txt").read_text().splitlines()]
    assert len(names) == 12
    for name in names:
        assert np.load(root / "audio" / f"{name}.npy").shape == (1, 32, 64)
    # an existing fbank (T x mel, OGM-GE's layout) is transposed and zero-padded
    source = np.load(raw / "audio" / f"{names[0]}.npy")
    prepared = np.load(root / "audio" / f"{names[0]}.npy")[0]
    np.testing.assert_allclose(prepared[:, :50], source.T)
    assert not prepared[:, 50:].any()
    if VIDEOS:
        test_names = (root / "test.txt").read_text().splitlines()
        video_clip = test_names[-1].split(",")[0]
        assert list_frames(root / "visual" / video_clip)
        assert np.isfinite(np.load(root / "audio" / f"{video_clip}.npy")).all()
    again = invoke(
        "prepare",
        "kinetics_sounds",
        "--raw",
        raw,
        "--out",
        root,
        "-q",
        "-o",
        "n_mels=32",
        "-o",
        "target_frames=64",
    )
    assert again.exit_code == 0 and "0 items written, 18 already prepared" in again.output


def test_kinetics_train_end_to_end(kinetics, tmp_path):
    _, root = kinetics
    result = invoke(
        "train",
        "-c",
        CONFIGS / "kinetics_sounds_joint.yaml",
        "--out",
        tmp_path,
        "--name",
        "r",
        "--set",
        f"dataset.options.root={root}",
        "--set",
        "dataset.options.val_fraction=0.25",
        *TINY_TRAIN,
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["test"]["num_samples"] == 6 and metrics["dataset"] == "kinetics_sounds"


def test_kinetics_loader_classes_and_frames(kinetics):
    _, root = kinetics
    data = load_dataset("kinetics_sounds", root=str(root), frame_size=16, val_fraction=0.25)
    assert data.num_classes == 3 and data.info.class_names == ("0", "1", "2")
    assert data.info.modalities[1].shape == (3, 3, 16, 16)
    batch = next(data.test.batches(6))
    assert batch.inputs["audio"].shape == (6, 1, 32, 64)
    assert torch.isfinite(batch.inputs["visual"]).all()


def test_configs_are_valid():
    from equimodal.config import build_config, load_yaml

    for name in ("cremad", "kinetics_sounds"):
        for method in ("joint", "shapley_alternating"):
            cfg = build_config(load_yaml(CONFIGS / f"{name}_{method}.yaml"))
            assert cfg.dataset.name == name and cfg.strategy.name == method
            assert {e.kind for e in cfg.model.encoders.values()} == {"resnet18"}
            assert cfg.optim.name == "sgd" and cfg.train.eval_batch_size <= 64


def test_cremad_without_split_files_uses_the_shipped_test_list(tmp_path):
    from equimodal.data.cremad import PACKAGED_TEST_SPLIT, read_split_file

    shipped, labels, _ = read_split_file(PACKAGED_TEST_SPLIT)
    assert len(shipped) == 744 and len(set(shipped)) == 744
    # OGM-GE's labels agree with the emotion in the clip name
    assert all(c.split("_")[2] == CREMAD_CLASSES[y] for c, y in zip(shipped, labels, strict=True))
    raw = tmp_path / "raw"
    make_cremad_raw(raw, train_per_class=1, test_per_class=0, videos=0)
    (raw / "train.csv").unlink()
    (raw / "test.csv").unlink()
    in_test = shipped[:3]
    for clip in in_test:
        write_wav(raw / "AudioWAV" / f"{clip}.wav", 1.0, freq=300)
        label = CREMAD_CLASSES.index(clip.split("_")[2])
        write_jpg(raw / "Image-01-FPS" / clip / "frame_00001.jpg", class_color(label))
    result = runner.invoke(
        app, ["prepare", "cremad", "--raw", str(raw), "--out", str(tmp_path / "root"), "-q"]
    )
    assert result.exit_code == 0, result.output
    assert "OGM-GE's list shipped with equimodal (3 of its 744" in one_line(result)
    test_rows = (tmp_path / "root" / "test.csv").read_text().splitlines()
    train_rows = (tmp_path / "root" / "train.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in test_rows] == in_test
    assert len(train_rows) == len(CREMAD_CLASSES)
    assert not {r.split(",")[0] for r in train_rows} & set(in_test)
    assert all(r.split(",")[1] == r.split(",")[0].split("_")[2] for r in train_rows)


def test_cremad_without_split_files_or_shipped_clips_names_the_fix(tmp_path):
    raw = tmp_path / "raw"
    make_cremad_raw(raw, train_per_class=1, test_per_class=0, videos=0)
    (raw / "train.csv").unlink()
    (raw / "test.csv").unlink()
    result = runner.invoke(
        app, ["prepare", "cremad", "--raw", str(raw), "--out", str(tmp_path / "root"), "-q"]
    )
    assert result.exit_code == 2
    assert "none of the 744 clips of OGM-GE's test list" in one_line(result)
    assert not (tmp_path / "root").exists()
