"""Tiny audio-visual datasets written in the real raw layouts (CREMA-D, Kinetics-Sounds).

Audio is a class-dependent tone plus noise (wav via soundfile), frames are class-coloured
jpgs (pillow), videos are made by the ffmpeg that ``equimodal.data.frames.find_ffmpeg`` finds
(imageio-ffmpeg ships one), so the prepare steps run on real files.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

CREMAD_CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")


def write_wav(path: Path, seconds: float, rate: int = 16000, freq: float = 440.0, seed: int = 0):
    """A mono 16-bit wav: a tone at ``freq`` plus a little noise."""
    import soundfile

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(t.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), wave.astype(np.float32), rate, subtype="PCM_16")


def write_jpg(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (64, 48)):
    """A jpg of ``color`` with a left-to-right ramp (``size`` is width x height).

    The ramp makes crops and flips visible.
    """
    from PIL import Image

    width, height = size
    ramp = np.linspace(-40, 40, width)[None, :, None]
    pixels = np.clip(np.asarray(color, dtype=np.float64)[None, None] + ramp, 0, 255)
    pixels = np.broadcast_to(pixels, (height, width, 3)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def make_video(path: Path, seconds: float = 2.0, audio: bool = False, size: str = "64x48"):
    """A short test-pattern video (flv1 for ``.flv``, H.264 otherwise), optionally with sound."""
    from equimodal.data.frames import find_ffmpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [find_ffmpeg(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    cmd += ["-f", "lavfi", "-i", f"testsrc=size={size}:rate=10:duration={seconds}"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=16000:duration={seconds}"]
    if path.suffix == ".flv":
        cmd += ["-c:v", "flv"]
    else:
        cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p"]
    cmd += ["-c:a", "aac", "-shortest"] if audio else ["-an"]
    subprocess.run([*cmd, str(path)], check=True, capture_output=True)


def class_color(label: int) -> tuple[int, int, int]:
    """A distinct colour per class."""
    return ((50 * label) % 256, (90 + 70 * label) % 256, (200 - 30 * label) % 256)


def make_cremad_raw(
    root: Path, train_per_class: int = 3, test_per_class: int = 1, videos: int = 2
) -> dict[str, list[str]]:
    """A CREMA-D download in OGM-GE's layout; the last ``videos`` clips have only a video.

    ``AudioWAV/<clip>.wav`` (16 kHz, 1-2 s), ``Image-01-FPS/<clip>/frame_0000k.jpg``
    (2-4 frames) or ``VideoFlash/<clip>.flv``, and ``train.csv`` / ``test.csv``.
    Returns the clip names per split.
    """
    clips: dict[str, list[str]] = {"train": [], "test": []}
    rows: dict[str, list[str]] = {"train": [], "test": []}
    k = 0
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for label, emotion in enumerate(CREMAD_CLASSES):
            for _ in range(per_class):
                clip = (
                    f"{1001 + k // len(SENTENCES):04d}_{SENTENCES[k % len(SENTENCES)]}_{emotion}_XX"
                )
                write_wav(
                    root / "AudioWAV" / f"{clip}.wav", 1.0 + 0.5 * (k % 3), freq=200 + 150 * label
                )
                clips[split].append(clip)
                rows[split].append(f"{clip},{emotion}")
                k += 1
    everything = clips["train"] + clips["test"]
    with_video = set(everything[-videos:]) if videos else set()
    for i, clip in enumerate(everything):
        if clip in with_video:
            make_video(root / "VideoFlash" / f"{clip}.flv", seconds=2.0)
            continue
        label = CREMAD_CLASSES.index(clip.split("_")[2])
        for t in range(2 + i % 3):
            write_jpg(root / "Image-01-FPS" / clip / f"frame_{t + 1:05d}.jpg", class_color(label))
    for split in ("train", "test"):
        (root / f"{split}.csv").write_text("\n".join(rows[split]) + "\n")
    return clips


def ks_name(k: int) -> str:
    """A YouTube-style clip name: 11-character id, start and end second."""
    return f"vid{k:08d}_{10 * k:06d}_{10 * k + 10:06d}"


def make_kinetics_raw(
    root: Path,
    num_classes: int = 3,
    train_per_class: int = 4,
    test_per_class: int = 2,
    n_mels: int = 32,
    videos: int = 2,
) -> dict[str, list[str]]:
    """A Kinetics-Sounds download in OGM-GE's layout, every audio and frame source used.

    ``my_train.txt`` / ``my_test.txt`` rows ``name,10,label``; audio as an existing fbank
    ``audio/<name>.npy`` (T x ``n_mels``, every third clip) or ``audio/<name>.wav``;
    frames in ``visual/<name>/frame_0000t.jpg``; the last ``videos`` clips have neither
    and only ``video/<name>.mp4`` with sound. Returns the clip names per split.
    """
    clips: dict[str, list[str]] = {"train": [], "test": []}
    lines: dict[str, list[str]] = {"train": [], "test": []}
    labels: dict[str, int] = {}
    k = 0
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for label in range(num_classes):
            for _ in range(per_class):
                name = ks_name(k)
                clips[split].append(name)
                labels[name] = label
                lines[split].append(f"{name},10,{label}")
                k += 1
    everything = clips["train"] + clips["test"]
    only_video = set(everything[-videos:]) if videos else set()
    rng = np.random.default_rng(0)
    for i, name in enumerate(everything):
        label = labels[name]
        if name in only_video:
            make_video(root / "video" / f"{name}.mp4", seconds=1.5, audio=True)
            continue
        if i % 3 == 0:
            fbank = rng.standard_normal((50, n_mels)).astype(np.float32) + label
            (root / "audio").mkdir(parents=True, exist_ok=True)
            np.save(root / "audio" / f"{name}.npy", fbank)
        else:
            write_wav(root / "audio" / f"{name}.wav", 1.0, freq=300 + 200 * label, seed=i)
        for t in range(3 + i % 2):
            write_jpg(root / "visual" / name / f"frame_0000{t + 1}.jpg", class_color(label))
    (root / "my_train.txt").write_text("\n".join(lines["train"]) + "\n")
    (root / "my_test.txt").write_text("\n".join(lines["test"]) + "\n")
    return clips
