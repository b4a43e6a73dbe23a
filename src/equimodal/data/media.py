"""Reading and converting media: wav audio, spectrograms, jpg frames, ffmpeg extraction.

Used by the audio-visual datasets (``cremad``, ``kinetics_sounds``) and their prepare steps.
Nothing here needs torchaudio, torchvision or librosa: audio is read with ``soundfile``,
spectrograms are computed with ``torch.stft`` and an own mel filterbank, images are read
with pillow, and videos are decoded by the ffmpeg program that
:func:`equimodal.prepare.find_ffmpeg` finds (a system ffmpeg or the one imageio-ffmpeg
ships). ``soundfile`` and ``pillow`` are imported when first used (the ``media`` extra).
"""

from __future__ import annotations

import copy
import math
import re
import subprocess
from collections.abc import Sequence
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equimodal.data.items import ItemSplit

#: ImageNet channel statistics (torchvision's ``Normalize`` values used by the community)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# --------------------------------------------------------------------------- audio
def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """``(waveform, sample_rate)``: mono float32 in [-1, 1] (channels averaged)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {str(path)!r} does not exist")
    try:
        import soundfile
    except ImportError:
        raise ImportError(
            "reading wav files needs soundfile: pip install 'equimodal[media]'"
        ) from None
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile reports every problem as its own error type
        raise ValueError(f"cannot read audio file {str(path)!r}: {err}") from None
    if data.shape[0] == 0:
        raise ValueError(f"audio file {str(path)!r} holds no samples")
    return np.ascontiguousarray(data.mean(axis=1), dtype=np.float32), int(rate)


def resample(wave: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """``wave`` resampled from ``orig_rate`` to ``target_rate`` (polyphase, scipy)."""
    if orig_rate == target_rate:
        return np.asarray(wave, dtype=np.float32)
    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} and {target_rate}")
    from scipy.signal import resample_poly

    g = gcd(int(orig_rate), int(target_rate))
    out = resample_poly(np.asarray(wave, dtype=np.float64), target_rate // g, orig_rate // g)
    return out.astype(np.float32)


def fix_length(wave: np.ndarray | torch.Tensor, sample_rate: int, seconds: float):
    """``wave`` tiled (when shorter) or cropped to ``round(seconds * sample_rate)`` samples.

    Short clips are repeated end to end, as OGM-GE does (``np.tile``); an empty clip
    becomes silence. Returns the same type (NumPy or torch) as ``wave``.
    """
    target = int(round(seconds * sample_rate))
    if target <= 0:
        raise ValueError(f"fix_length needs a positive length, got {seconds} s at {sample_rate} Hz")
    n = int(wave.shape[-1])
    if isinstance(wave, torch.Tensor):
        if n == 0:
            return wave.new_zeros(target)
        reps = -(-target // n)
        return wave.repeat(reps)[:target] if reps > 1 else wave[:target]
    wave = np.asarray(wave)
    if n == 0:
        return np.zeros(target, dtype=wave.dtype if wave.dtype.kind == "f" else np.float32)
    reps = -(-target // n)
    return np.tile(wave, reps)[:target] if reps > 1 else wave[:target]


def _window(name: str, length: int) -> torch.Tensor:
    windows = {
        "hann": torch.hann_window,
        "hamming": torch.hamming_window,
        "blackman": torch.blackman_window,
        "rect": torch.ones,
    }
    if name not in windows:
        raise ValueError(f"unknown window {name!r}; choose one of {', '.join(windows)}")
    if name == "rect":
        return torch.ones(length, dtype=torch.float64)
    return windows[name](length, periodic=True, dtype=torch.float64)


def _as_tensor(wave: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(wave) if not isinstance(wave, torch.Tensor) else wave)
    if x.dim() != 1:
        raise ValueError(f"expected a mono waveform of shape (N,), got {tuple(x.shape)}")
    return x.to(torch.float64)


def stft_frames(num_samples: int, hop: int) -> int:
    """Frames of a centred STFT (``torch.stft(center=True)``): ``1 + num_samples // hop``."""
    return 1 + num_samples // hop


def log_stft(
    wave: np.ndarray | torch.Tensor, n_fft: int = 512, hop: int = 353, window: str = "hann"
) -> torch.Tensor:
    """``log(|STFT| + 1e-7)`` of a mono waveform, shape ``(1, n_fft // 2 + 1, T)``.

    Centred frames (zero padding of ``n_fft // 2`` at both ends, as librosa's default),
    so ``T = 1 + N // hop``; a periodic window of length ``n_fft``. With OGM-GE's CREMA-D
    settings (3 s at 22050 Hz, n_fft 512, hop 353) the result is 257 x 188.
    """
    x = _as_tensor(wave)
    if x.shape[0] == 0:
        raise ValueError("cannot take the STFT of an empty waveform")
    spec = torch.stft(
        x,
        n_fft=n_fft,
        hop_length=hop,
        win_length=n_fft,
        window=_window(window, n_fft),
        center=True,
        pad_mode="constant",
        return_complex=True,
    )
    return torch.log(spec.abs() + 1e-7).to(torch.float32).unsqueeze(0)


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: ``1127 * ln(1 + f / 700)``."""
    return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)


def mel_filterbank(
    n_mels: int, n_fft: int, sample_rate: int, f_min: float = 20.0, f_max: float | None = None
) -> torch.Tensor:
    """Triangular mel filters, ``(n_mels, n_fft // 2 + 1)``, Kaldi style.

    Triangles are linear on the HTK mel scale, their corners equally spaced in mel
    between ``f_min`` and ``f_max`` (default: Nyquist); the weights are peak-1 (not
    area-normalised) and the Nyquist bin gets no weight, as in Kaldi's ``fbank``.
    """
    nyquist = sample_rate / 2.0
    f_max = nyquist if f_max is None else (f_max if f_max > 0 else nyquist + f_max)
    if not 0.0 <= f_min < f_max <= nyquist:
        raise ValueError(
            f"mel filterbank needs 0 <= f_min < f_max <= {nyquist}, got {f_min} and {f_max}"
        )
    if n_mels <= 0:
        raise ValueError(f"n_mels must be positive, got {n_mels}")
    bins = n_fft // 2
    mel_bins = hz_to_mel(np.arange(bins) * sample_rate / n_fft)
    lo, hi = hz_to_mel(f_min), hz_to_mel(f_max)
    corners = lo + (hi - lo) * np.arange(n_mels + 2) / (n_mels + 1)
    left, centre, right = corners[:-2, None], corners[1:-1, None], corners[2:, None]
    up = (mel_bins[None] - left) / (centre - left)
    down = (right - mel_bins[None]) / (right - centre)
    weights = np.clip(np.minimum(up, down), 0.0, None)
    full = np.zeros((n_mels, bins + 1), dtype=np.float64)
    full[:, :bins] = weights
    return torch.from_numpy(full)


def log_mel_fbank(
    wave: np.ndarray | torch.Tensor,
    sample_rate: int,
    n_mels: int = 128,
    n_fft: int | None = None,
    hop: int | None = None,
    win_length: int | None = None,
    f_min: float = 20.0,
    f_max: float | None = None,
    preemphasis: float = 0.97,
) -> torch.Tensor:
    """Log mel filterbank energies, shape ``(1, n_mels, T)``, Kaldi ``fbank`` style.

    Defaults follow the audio front end of AST and of the Kinetics-Sounds preprocessing
    of OGM-GE (``torchaudio.compliance.kaldi.fbank`` with a Hanning window, 128 bins,
    10 ms shift, no dither, no energy): 25 ms frames every 10 ms without edge padding
    (``T = 1 + (N - win) // hop``), each frame's mean removed, pre-emphasis 0.97, a
    symmetric Hann window, power spectrum on ``n_fft`` points (next power of two of the
    frame), mel filters of :func:`mel_filterbank`, natural log floored at float eps.
    """
    x = _as_tensor(wave)
    win = int(round(0.025 * sample_rate)) if win_length is None else int(win_length)
    hop = int(round(0.010 * sample_rate)) if hop is None else int(hop)
    n_fft = 1 << max(win - 1, 1).bit_length() if n_fft is None else int(n_fft)
    if win <= 0 or hop <= 0 or n_fft < win:
        raise ValueError(f"need 0 < win_length <= n_fft and hop > 0, got {win}, {n_fft}, {hop}")
    if x.shape[0] < win:  # one frame at least
        x = torch.nn.functional.pad(x, (0, win - x.shape[0]))
    frames = x.unfold(0, win, hop)  # (T, win)
    frames = frames - frames.mean(dim=1, keepdim=True)
    if preemphasis:
        previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
        frames = frames - preemphasis * previous
    window = torch.hann_window(win, periodic=False, dtype=torch.float64)
    power = torch.fft.rfft(frames * window, n=n_fft).abs().pow(2)  # (T, n_fft // 2 + 1)
    mel = power @ mel_filterbank(n_mels, n_fft, sample_rate, f_min, f_max).T
    eps = torch.finfo(torch.float32).eps
    return torch.log(mel.clamp_min(eps)).T.to(torch.float32).unsqueeze(0)


# --------------------------------------------------------------------------- frames
def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_frames(folder: str | Path) -> list[Path]:
    """Image files (jpg, jpeg, png) in ``folder``, in natural sorted order (2 before 10)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(found, key=lambda p: _natural_key(p.name))


def sample_frame_indices(
    num_available: int,
    num_frames: int,
    train: bool,
    generator: np.random.Generator | torch.Generator | None = None,
) -> list[int]:
    """Sorted indices of ``num_frames`` frames out of ``num_available`` (TSN-style).

    The frames are cut into ``num_frames`` evenly spaced segments; training draws one
    frame uniformly inside each segment (from ``generator``, NumPy or torch), evaluation
    takes each segment's centre. With fewer frames than asked, frames repeat.
    """
    if num_available <= 0:
        raise ValueError("no frames to sample from")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    out = []
    for i in range(num_frames):
        start = (i * num_available) // num_frames
        stop = max(((i + 1) * num_available) // num_frames, start + 1)
        if not train:
            out.append((start + stop - 1) // 2)
        elif isinstance(generator, torch.Generator):
            out.append(int(torch.randint(start, stop, (1,), generator=generator)))
        else:
            rng = generator if generator is not None else np.random.default_rng()
            out.append(int(rng.integers(start, stop)))
    return out


def _open_rgb(path: Path):
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading frames needs pillow: pip install 'equimodal[media]'") from None
    if not path.is_file():
        raise FileNotFoundError(f"frame {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:  # pillow raises several error types for bad files
        raise ValueError(f"cannot read image {str(path)!r}: {err}") from None


def _random_crop_box(
    width: int, height: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """A random-resized-crop box: area 8-100 %, aspect 3/4-4/3 (torchvision's defaults)."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    side = min(width, height)  # fall back to the centre square
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def load_frames(
    paths: Sequence[str | Path],
    size: int = 224,
    *,
    augment: bool = False,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Frames as float32 ``(T, 3, size, size)``, RGB, ImageNet-normalised.

    Each image is resized to ``size`` x ``size`` (bilinear). With ``augment`` one random
    resized crop and one random horizontal flip (probability 1/2), drawn from ``rng``,
    are applied to every frame of the clip alike.
    """
    if not paths:
        raise ValueError("load_frames needs at least one path")
    images = [_open_rgb(Path(p)) for p in paths]
    from PIL import Image

    box, flip = None, False
    if augment:
        rng = rng if rng is not None else np.random.default_rng()
        box = _random_crop_box(*images[0].size, rng)
        flip = bool(rng.random() < 0.5)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = torch.empty(len(images), 3, size, size, dtype=torch.float32)
    for t, img in enumerate(images):
        if box is not None and img.size == images[0].size:
            img = img.crop(box)
        img = img.resize((size, size), Image.BILINEAR)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        out[t] = (x.float() / 255.0 - mean) / std
    return out


# --------------------------------------------------------------------------- ffmpeg
def _run_ffmpeg(args: list[str], source: Path, what: str) -> bytes:
    from equimodal.prepare import find_ffmpeg

    command = [find_ffmpeg(), "-nostdin", "-hide_banner", "-loglevel", "error", *args]
    try:
        done = subprocess.run(command, capture_output=True, check=False)
    except OSError as err:
        raise FileNotFoundError(f"cannot run ffmpeg ({command[0]}): {err}") from None
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit code {done.returncode}"
        raise ValueError(f"ffmpeg could not {what} {str(source)!r}: {reason}")
    return done.stdout


def extract_frames(video: str | Path, out_dir: str | Path, fps: float, size: int | None) -> int:
    """Write ``video``'s frames at ``fps`` as ``out_dir/frame_00000.jpg``, ...; the count.

    ``size`` scales each frame so its shorter side has ``size`` pixels (None keeps the
    video's size). The folder is written under a temporary name and renamed when
    complete (:func:`equimodal.prepare.atomic_output`), replacing an older one.
    """
    from equimodal.prepare import atomic_output

    video, out_dir = Path(video), Path(out_dir)
    if not video.is_file():
        raise FileNotFoundError(f"video {str(video)!r} does not exist")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    filters = [f"fps={fps:g}"]
    if size is not None:
        filters.append(f"scale={size}:{size}:force_original_aspect_ratio=increase")
    with atomic_output(out_dir) as tmp:
        tmp.mkdir(parents=True)
        _run_ffmpeg(
            [
                "-i",
                str(video),
                "-an",
                "-vf",
                ",".join(filters),
                "-q:v",
                "2",
                "-start_number",
                "0",
                str(tmp / "frame_%05d.jpg"),
            ],
            video,
            "extract frames from",
        )
        count = len(list_frames(tmp))
        if count == 0:
            raise ValueError(f"ffmpeg wrote no frames for video {str(video)!r}")
    return count


def extract_audio(video: str | Path, sample_rate: int) -> np.ndarray:
    """The sound track of ``video`` as a mono float32 waveform at ``sample_rate`` (ffmpeg)."""
    video = Path(video)
    if not video.is_file():
        raise FileNotFoundError(f"video {str(video)!r} does not exist")
    raw = _run_ffmpeg(
        ["-i", str(video), "-vn", "-ac", "1", "-ar", str(int(sample_rate)), "-f", "f32le", "-"],
        video,
        "read the sound of",
    )
    wave = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if wave.size == 0:
        raise ValueError(f"video {str(video)!r} has no sound track")
    return wave


# --------------------------------------------------------------------------- AV datasets
# The prepared layout shared by the audio-visual datasets (written by their preparers):
#   ROOT/prepare.json            dataset name and the settings the files were made with
#   ROOT/<split files>           the community split files (items that failed left out)
#   ROOT/audio/<name>.npy        float32 spectrogram (1, F, T)
#   ROOT/visual/<name>/*.jpg     frames, read in natural sorted order
PREPARE_FILE = "prepare.json"
VIDEO_SUFFIXES = (".mp4", ".flv", ".avi", ".mkv", ".webm", ".mov")


def prepare_hint(dataset: str, root: str | Path) -> str:
    """The command that writes a prepared folder."""
    return f"run `equimodal prepare {dataset} --raw RAW_FOLDER --out {root}`"


def prepared_root(root: str | None, dataset: str) -> Path:
    """``dataset.options.root`` as a path; a one-line error with the prepare hint if unset."""
    if root is None:
        raise ValueError(
            f"dataset {dataset!r} needs dataset.options.root, the folder of a prepared copy; "
            + prepare_hint(dataset, "ROOT")
        )
    return Path(root).expanduser()


def read_prepare_json(root: str | Path, dataset: str) -> dict[str, Any]:
    """The settings of a prepared folder; a one-line error when it is not one."""
    import json

    path = Path(root) / PREPARE_FILE
    if Path(root).exists() and not Path(root).is_dir():
        raise NotADirectoryError(
            f"dataset root {str(root)!r} is a file; dataset.options.root must be the folder "
            f"of a prepared copy ({prepare_hint(dataset, 'ROOT')})"
        )
    if not Path(root).is_dir():
        raise FileNotFoundError(
            f"dataset root {str(root)!r} does not exist; {prepare_hint(dataset, root)}"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist, so {str(root)!r} is not a prepared {dataset} "
            f"folder; {prepare_hint(dataset, root)}"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {str(path)!r}: {err}") from None
    if not isinstance(meta, dict) or meta.get("dataset") != dataset:
        found = meta.get("dataset") if isinstance(meta, dict) else None
        raise ValueError(f"{str(path)!r} describes dataset {found!r}, not {dataset!r}")
    return meta


def write_prepare_json(out: Path, dataset: str, settings: dict[str, Any], overwrite: bool) -> None:
    """Record ``settings``; refuse a folder prepared with other settings unless ``overwrite``."""
    import json

    from equimodal.prepare import atomic_output

    path = out / PREPARE_FILE
    if path.is_file() and not overwrite:
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("dataset") not in (None, dataset):
            raise ValueError(
                f"{str(out)!r} holds a prepared {old.get('dataset')!r} dataset; "
                "choose another --out folder"
            )
        for key, value in settings.items():
            before = old.get("settings", {}).get(key)
            if key in old.get("settings", {}) and before != value:
                raise ValueError(
                    f"{str(out)!r} was prepared with {key}={before!r}, now {key}={value!r}; "
                    "use a new --out folder or add -o overwrite=true"
                )
    with atomic_output(path) as tmp:
        text = json.dumps({"dataset": dataset, "settings": settings}, indent=2)
        tmp.write_text(text + "\n", encoding="utf-8")


def remove_partials(out: Path) -> int:
    """Delete what a killed prepare run left half-written (``.<name>.partial``); the count."""
    import shutil

    count = 0
    for folder in (out, out / "audio", out / "visual"):
        if folder.is_dir():
            for leftover in folder.glob(".*.partial"):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
                count += 1
    return count


def write_text_file(path: Path, lines: Sequence[str]) -> None:
    """Write ``lines`` (newline-terminated) to ``path`` atomically."""
    from equimodal.prepare import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def find_source(name: str, folders: Sequence[Path], suffixes: Sequence[str]) -> Path | None:
    """The first ``folder/name<suffix>`` that exists, trying folders then suffixes."""
    for folder in folders:
        for suffix in suffixes:
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def find_frame_folder(name: str, folders: Sequence[Path]) -> Path | None:
    """The first ``folder/name/`` holding at least one image."""
    for folder in folders:
        if list_frames(folder / name):
            return folder / name
    return None


def copy_frames(source: Path, dest: Path, size: int | None) -> int:
    """Copy the images of ``source`` into ``dest`` atomically (shorter side scaled to ``size``)."""
    import shutil

    from equimodal.prepare import atomic_output

    frames = list_frames(source)
    if not frames:
        raise ValueError(f"frame folder {str(source)!r} holds no images")
    with atomic_output(dest) as tmp:
        tmp.mkdir(parents=True)
        for frame in frames:
            if size is None:
                shutil.copyfile(frame, tmp / frame.name)
                continue
            from PIL import Image

            img = _open_rgb(frame)
            scale = size / min(img.size)
            new = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
            img.resize(new, Image.BILINEAR).save(tmp / f"{frame.stem}.jpg", quality=95)
    return len(frames)


def save_npy(path: Path, array: np.ndarray) -> None:
    """Save ``array`` as ``path`` (.npy) atomically."""
    from equimodal.prepare import atomic_output

    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array, dtype=np.float32))


def npy_shape(path: Path) -> tuple[int, ...] | None:
    """The shape stored in a ``.npy`` header (None when unreadable)."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            shape, _, _ = (
                np.lib.format.read_array_header_1_0(fh)
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0(fh)
            )
        return tuple(int(s) for s in shape)
    except (OSError, ValueError):
        return None


def run_items(
    dataset: str,
    names: Sequence[str],
    work: Any,
    progress: bool,
    workers: int = 1,
    strict: bool = False,
) -> tuple[int, int, dict[str, str]]:
    """Run ``work(name) -> bool`` (True: wrote something) over ``names`` with a progress bar.

    Returns ``(written, skipped, failures)``; ``failures`` maps a name to the one-line
    reason its media could not be converted (``strict`` raises the first one instead).
    Missing programs or packages (ffmpeg, soundfile, pillow) always raise.
    """
    from concurrent.futures import ThreadPoolExecutor

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    written = skipped = 0
    failures: dict[str, str] = {}

    def one(name: str) -> tuple[str, bool | None, str]:
        try:
            return name, bool(work(name)), ""
        except (ValueError, FileNotFoundError) as err:
            if strict or "ffmpeg is needed" in str(err):
                raise
            return name, None, str(err)

    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task(f"prepare {dataset}", total=len(names))
        if workers <= 1:
            results = map(one, names)
            pool = None
        else:
            pool = ThreadPoolExecutor(max_workers=workers)
            results = pool.map(one, names)
        try:
            for name, wrote, reason in results:
                if wrote is None:
                    failures[name] = reason
                elif wrote:
                    written += 1
                else:
                    skipped += 1
                bar.advance(task)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    return written, skipped, failures


def failure_notes(out: Path, failures: dict[str, str], total: int) -> list[str]:
    """Notes for a prepare summary; the failed names are listed in ``out/left_out.txt``."""
    path = out / "left_out.txt"
    if not failures:
        if path.exists():
            path.unlink()
        return []
    write_text_file(path, [f"{name}\t{reason}" for name, reason in failures.items()])
    first, reason = next(iter(failures.items()))
    return [
        f"{len(failures)} of {total} items could not be prepared and are left out of the "
        f"split files (listed in {path}); first: {first}: {reason}"
    ]


def check_options(model: type, options: dict[str, Any], what: str):
    """Validate preparer options with a pydantic ``model``; a one-line error otherwise."""
    from pydantic import ValidationError

    from equimodal.config import format_validation_error

    try:
        return model.model_validate(options)
    except ValidationError as err:
        raise ValueError(f"{what}: {format_validation_error(err, model)}") from None


def folder_list(raw: Path, value: str | Sequence[str] | None) -> list[Path]:
    """Folders under ``raw`` from an option: a name, comma-separated names, or a list."""
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else list(value)
    return [raw / str(p).strip() for p in parts if str(p).strip()]


def item_rng(seed: int, split: Any, item: dict[str, Any]) -> np.random.Generator:
    """The generator of one training item: seeded by (seed, pass over ``split``, row)."""
    passes = int(getattr(split, "passes", 0))
    return np.random.default_rng([seed, passes, int(item["row"])])


class AVReader:
    """Reads one item ``{"row", "audio", "frames"}`` of a prepared audio-visual dataset.

    The spectrogram comes from the ``.npy`` cache (cropped to ``audio_frames`` time
    frames), the frames from jpg files: ``num_frames`` of them by
    :func:`sample_frame_indices`, resized to ``frame_size``. Training draws the frames
    and the augmentation from a generator seeded by (seed, pass over the split, row),
    so runs reproduce whatever the number of loader workers, and the global RNG (dropout
    masks) is not touched.
    """

    def __init__(
        self,
        num_frames: int,
        frame_size: int,
        audio_frames: int,
        train: bool = False,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self.num_frames = num_frames
        self.frame_size = frame_size
        self.audio_frames = audio_frames
        self.train = train
        self.augment = augment
        self.seed = seed
        self.split: Any = None  # the ItemSplit, for its pass counter

    def __call__(self, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        rng = item_rng(self.seed, self.split, item) if self.train else None
        try:
            spec = np.load(item["audio"], allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            reason = err or type(err).__name__
            raise ValueError(f"cannot read spectrogram {item['audio']!r}: {reason}") from None
        if spec.ndim == 2:
            spec = spec[None]
        spec = np.ascontiguousarray(spec[..., : self.audio_frames], dtype=np.float32)
        frames = item["frames"]
        picks = sample_frame_indices(len(frames), self.num_frames, self.train, rng)
        visual = load_frames(
            [frames[i] for i in picks],
            self.frame_size,
            augment=self.train and self.augment,
            rng=rng,
        )
        return {"audio": torch.from_numpy(spec), "visual": visual}


class AVItemSplit(ItemSplit):
    """An ItemSplit whose :class:`AVReader` follows it to a device copy (pass counter)."""

    def to(self, device: torch.device | str) -> ItemSplit:
        """The same split, its batches delivered on ``device``."""
        out = super().to(device)
        reader = copy.copy(self.read)
        reader.split = out
        out.read = reader
        return out


def reader_split(
    items: Sequence[Any],
    ids: np.ndarray,
    reader: Any,
    labels: np.ndarray,
    shapes: dict[str, tuple[int, ...]],
    num_workers: int,
    dtypes: dict[str, torch.dtype] | None = None,
) -> AVItemSplit:
    """The rows ``ids`` of ``items`` as a split read by ``reader`` (given the split back)."""
    split = AVItemSplit(
        [items[i] for i in ids],
        reader,
        torch.from_numpy(labels[ids]),
        shapes,
        indices=torch.from_numpy(np.asarray(ids, dtype=np.int64)),
        num_workers=num_workers,
        **({"dtypes": dtypes} if dtypes else {}),
    )
    reader.split = split
    return split


def build_av_data(
    info: Any,
    root: Path,
    names: dict[str, list[str]],
    labels: dict[str, list[int]],
    audio_shape: tuple[int, ...],
    frame_rate: float,
    *,
    seed: int,
    num_frames: int,
    frame_size: int,
    audio_seconds: float | None,
    val_fraction: float,
    num_workers: int,
    max_items: int | None,
    augment: bool,
    options: dict[str, Any] | None = None,
) -> Any:
    """Train / val / test :class:`~equimodal.data.items.ItemSplit` s of a prepared folder.

    ``names`` / ``labels`` hold the ``train`` and ``test`` rows of the split files;
    validation is a stratified ``val_fraction`` of train for ``seed``. Every file is
    checked here, in the main process: a missing one is a single FileNotFoundError naming
    the first missing file and the count.
    """
    from dataclasses import replace

    from equimodal.data.base import ModalitySpec, MultimodalData
    from equimodal.data.splits import stratified_holdout

    dataset = info.name
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if frame_size < 8:
        raise ValueError(f"frame_size must be >= 8, got {frame_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items must be >= 1 or null, got {max_items}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    total_frames = int(audio_shape[-1])
    audio_frames = total_frames
    if audio_seconds is not None:
        if audio_seconds <= 0:
            raise ValueError(f"audio_seconds must be positive, got {audio_seconds}")
        audio_frames = 1 + int(audio_seconds * frame_rate)
        if audio_frames > total_frames:
            raise ValueError(
                f"audio_seconds={audio_seconds} needs {audio_frames} spectrogram frames but "
                f"{str(root)!r} was prepared with {total_frames}; prepare it for longer audio"
            )
    rows: dict[str, list[tuple[str, int]]] = {}
    for split in ("train", "test"):
        pairs = list(zip(names[split], labels[split], strict=True))
        rows[split] = pairs[:max_items] if max_items is not None else pairs
    items: list[dict[str, Any]] = []
    all_labels: list[int] = []
    missing: list[str] = []
    for split in ("train", "test"):
        for name, label in rows[split]:
            audio = root / "audio" / f"{name}.npy"
            frames = list_frames(root / "visual" / name)
            if not audio.is_file():
                missing.append(str(audio))
            if not frames:
                missing.append(str(root / "visual" / name / "*.jpg"))
            items.append(
                {"row": len(items), "audio": str(audio), "frames": [str(f) for f in frames]}
            )
            all_labels.append(label)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} files of dataset {dataset!r} are missing under {str(root)!r}; "
            f"first: {missing[0]}; {prepare_hint(dataset, root)} (finished items are skipped)"
        )
    y = np.asarray(all_labels, dtype=np.int64)
    n_train = len(rows["train"])
    train_rows, test_rows = np.arange(n_train), np.arange(n_train, len(items))
    if n_train < 2 or len(test_rows) == 0:
        raise ValueError(
            f"dataset {dataset!r} at {str(root)!r} has {n_train} train and {len(test_rows)} "
            "test items; need at least 2 and 1"
        )
    try:
        train_rows, val_rows = stratified_holdout(train_rows, y, val_fraction, seed)
    except ValueError as err:
        if max_items is None:
            raise ValueError(
                f"dataset {dataset!r}: cannot hold out a stratified validation split ({err})"
            ) from None
        # a few items for a quick run: some class may have a single training item
        order = np.random.default_rng(seed).permutation(train_rows)
        n_val = max(1, int(round(val_fraction * len(order))))
        val_rows, train_rows = np.sort(order[:n_val]), np.sort(order[n_val:])
    audio_shape = (*tuple(audio_shape[:-1]), audio_frames)
    visual_shape = (num_frames, 3, frame_size, frame_size)
    shapes = {"audio": audio_shape, "visual": visual_shape}

    def make(ids: np.ndarray, train: bool) -> ItemSplit:
        reader = AVReader(num_frames, frame_size, audio_frames, train, augment, seed)
        return reader_split(items, ids, reader, y, shapes, num_workers)

    new_info = replace(
        info,
        modalities=(
            ModalitySpec("audio", audio_shape, "spectrogram"),
            ModalitySpec("visual", visual_shape, "frames"),
        ),
        num_samples=len(items),
    )
    return MultimodalData(
        info=new_info,
        train=make(train_rows, True),
        val=make(val_rows, False),
        test=make(test_rows, False),
        options=dict(options)
        if options is not None
        else {
            "root": str(root),
            "num_frames": num_frames,
            "frame_size": frame_size,
            "audio_seconds": audio_seconds,
            "val_fraction": val_fraction,
            "max_items": max_items,
            "augment": augment,
        },
    )
