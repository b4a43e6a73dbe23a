"""Audio: reading wav files and sound tracks, resampling, and spectrograms.

The log-STFT of OGM-GE's CREMA-D features and the Kaldi-style log-mel filterbank of the
Kinetics-Sounds features, computed with ``torch.stft`` / ``torch.fft`` and an own mel
filterbank, so neither torchaudio nor librosa is needed. Wav files are read with
``soundfile`` (the ``media`` extra, imported when first used); the sound of a video is
decoded by ffmpeg (:func:`equimodal.data.frames.find_ffmpeg`).
"""

from __future__ import annotations

from collections.abc import Callable
from math import gcd
from pathlib import Path

import numpy as np
import torch

from equimodal.data.frames import run_ffmpeg


# --------------------------------------------------------------------------- reading
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


def extract_audio(video: str | Path, sample_rate: int) -> np.ndarray:
    """The sound track of ``video`` as a mono float32 waveform at ``sample_rate`` (ffmpeg)."""
    video = Path(video)
    if not video.is_file():
        raise FileNotFoundError(f"video {str(video)!r} does not exist")
    raw = run_ffmpeg(
        ["-i", str(video), "-vn", "-ac", "1", "-ar", str(int(sample_rate)), "-f", "f32le", "-"],
        video,
        "read the sound of",
    )
    wave = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if wave.size == 0:
        raise ValueError(f"video {str(video)!r} has no sound track")
    return wave


# --------------------------------------------------------------------------- length
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


# --------------------------------------------------------------------------- spectrograms
def _window(name: str, length: int) -> torch.Tensor:
    windows: dict[str, Callable[..., torch.Tensor]] = {
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
    wave: np.ndarray | torch.Tensor,
    n_fft: int = 512,
    hop: int = 353,
    window: str = "hann",
    pad_mode: str = "constant",
) -> torch.Tensor:
    """``log(|STFT| + 1e-7)`` of a mono waveform, shape ``(1, n_fft // 2 + 1, T)``.

    ``librosa.stft(wave, n_fft=n_fft, hop_length=hop)`` followed by ``log(|.| + 1e-7)``,
    as in OGM-GE's CREMA-D loader: centred frames, the waveform padded by ``n_fft // 2``
    at both ends, so ``T = 1 + N // hop``; a periodic window of length ``n_fft``. The
    padding is zeros (``pad_mode="constant"``, librosa's default since 0.9); librosa
    before 0.9 reflected the waveform (``pad_mode="reflect"``), which changes only the
    first and last frame. With OGM-GE's CREMA-D settings (3 s at 22050 Hz, n_fft 512,
    hop 353) the result is 257 x 188.
    """
    x = _as_tensor(wave)
    if x.shape[0] == 0:
        raise ValueError("cannot take the STFT of an empty waveform")
    if pad_mode not in ("constant", "reflect"):
        raise ValueError(f"pad_mode must be 'constant' or 'reflect', got {pad_mode!r}")
    if pad_mode == "reflect" and x.shape[0] <= n_fft // 2:
        raise ValueError(
            f"reflect padding needs more than n_fft // 2 = {n_fft // 2} samples, got {x.shape[0]}"
        )
    spec = torch.stft(
        x,
        n_fft=n_fft,
        hop_length=hop,
        win_length=n_fft,
        window=_window(window, n_fft),
        center=True,
        pad_mode=pad_mode,
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

    This is Kaldi's ``compute-fbank-feats`` with ``--dither=0 --window-type=hanning
    --use-energy=false`` and the same bins and frequencies; the test suite checks it
    against kaldi-native-fbank (log-mel within 1e-3 wherever the energy is within 60 dB
    of the frame's strongest bin). With 128 bins at 16 kHz one low filter is narrower
    than an FFT bin and covers none, so it reads ``log(eps)`` in every frame, as
    torchaudio's ``kaldi.fbank`` gives; Kaldi itself refuses that setting.
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
