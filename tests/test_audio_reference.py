"""equimodal's fbank and STFT against independent reference implementations.

* ``log_mel_fbank`` against kaldi-native-fbank's ``OnlineFbank`` (Kaldi's
  ``compute-fbank-feats`` in C++) with the same options: no dither, Hanning window,
  25 ms frames every 10 ms, ``snip_edges``, DC removal, pre-emphasis 0.97, power
  spectrum, no energy, log floored at float eps. Tolerance on the natural-log mel
  energies: ``1e-3`` wherever the energy is within 60 dB of the frame's strongest bin,
  ``5e-3`` everywhere (observed at most 2.8e-4 and 1.7e-3: kaldi-native-fbank computes
  in float32, so bins far below the frame's energy carry its rounding error).
* ``log_stft`` against NumPy (``np.fft.rfft`` over frames cut by hand, float64):
  tolerance ``1e-6`` (observed 2.4e-7, the float32 rounding of the result), and against
  kaldi-native-fbank's ``Stft`` (float32): tolerance ``2e-3`` (observed 7e-4).
"""

from __future__ import annotations

import numpy as np
import pytest

from equimodal.data.audio import log_mel_fbank, log_stft, mel_filterbank

FBANK_ATOL_WITHIN_60DB = 1e-3
FBANK_ATOL = 5e-3
STFT_NUMPY_ATOL = 1e-6
STFT_KALDI_ATOL = 2e-3


def chirp_with_noise(sample_rate: int, seconds: float = 3.0) -> np.ndarray:
    """A linear chirp from 100 Hz to 45% of the sample rate plus white noise, float32."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0, f1 = 100.0, 0.45 * sample_rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t**2)
    noise = np.random.default_rng(0).standard_normal(t.size)
    return (0.5 * np.sin(phase) + 0.05 * noise).astype(np.float32)


def kaldi_fbank(knf, wave: np.ndarray, rate: int, bins: int, low: float, high: float):
    """kaldi-native-fbank's log mel energies ``(T, bins)`` with equimodal's settings."""
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = rate
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = "hanning"
    opts.frame_opts.frame_length_ms = 25.0
    opts.frame_opts.frame_shift_ms = 10.0
    opts.frame_opts.snip_edges = True
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.round_to_power_of_two = True
    opts.mel_opts.num_bins = bins
    opts.mel_opts.low_freq = low
    opts.mel_opts.high_freq = high
    opts.use_energy = False
    opts.use_power = True
    opts.use_log_fbank = True
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(rate, wave.tolist())
    fbank.input_finished()
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


@pytest.mark.parametrize(
    ("rate", "bins", "low", "high"),
    [
        (16000, 80, 20.0, 0.0),
        (16000, 40, 100.0, -400.0),  # a negative high frequency counts down from Nyquist
        (22050, 128, 20.0, 0.0),
        (44100, 128, 20.0, 0.0),
        (8000, 23, 20.0, 0.0),
    ],
)
def test_fbank_matches_kaldi_native_fbank(rate, bins, low, high):
    knf = pytest.importorskip("kaldi_native_fbank")
    wave = chirp_with_noise(rate)
    ours = log_mel_fbank(wave, rate, n_mels=bins, f_min=low, f_max=high or None)[0].T.numpy()
    reference = kaldi_fbank(knf, wave, rate, bins, low, high)
    frames = 1 + (len(wave) - round(0.025 * rate)) // round(0.010 * rate)  # snip_edges
    assert ours.shape == reference.shape == (frames, bins)
    error = np.abs(ours - reference)
    strong = ours - ours.max(axis=1, keepdims=True) > -6 * np.log(10)  # within 60 dB
    assert error[strong].max() < FBANK_ATOL_WITHIN_60DB
    assert error.max() < FBANK_ATOL


def test_128_bins_at_16khz_leave_one_filter_empty_which_kaldi_refuses():
    """As torchaudio's kaldi.fbank (OGM-GE's Kinetics-Sounds features): one empty filter."""
    empty = np.nonzero(mel_filterbank(128, 512, 16000).sum(dim=1).numpy() == 0)[0]
    assert empty.tolist() == [3]
    wave = chirp_with_noise(16000, seconds=0.5)
    fbank = log_mel_fbank(wave, 16000, n_mels=128)[0].numpy()
    np.testing.assert_allclose(fbank[3], np.log(np.finfo(np.float32).eps), rtol=1e-6)
    knf = pytest.importorskip("kaldi_native_fbank")
    with pytest.raises(ValueError, match="num_mel_bins too large"):
        kaldi_fbank(knf, wave, 16000, 128, 20.0, 0.0)


def numpy_log_stft(wave: np.ndarray, n_fft: int, hop: int, pad_mode: str) -> np.ndarray:
    """``log(|STFT| + 1e-7)`` by hand: centred frames, periodic Hann window, rfft."""
    padded = np.pad(wave.astype(np.float64), n_fft // 2, mode=pad_mode)
    frames = np.stack([padded[t * hop : t * hop + n_fft] for t in range(1 + len(wave) // hop)])
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    return np.log(np.abs(np.fft.rfft(frames * window, axis=1)) + 1e-7).T


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_stft_matches_numpy_frames(pad_mode):
    wave = chirp_with_noise(22050)  # OGM-GE's CREMA-D settings: 3 s at 22050 Hz
    ours = log_stft(wave, n_fft=512, hop=353, pad_mode=pad_mode)
    assert ours.shape == (1, 257, 188)
    reference = numpy_log_stft(wave, 512, 353, pad_mode)
    assert np.abs(ours[0].numpy() - reference).max() < STFT_NUMPY_ATOL


def test_padding_changes_only_the_edge_frames():
    wave = chirp_with_noise(22050)
    zeros = log_stft(wave, 512, 353, pad_mode="constant")[0].numpy()
    mirror = log_stft(wave, 512, 353, pad_mode="reflect")[0].numpy()
    differs = np.nonzero(np.abs(zeros - mirror).max(axis=0) > 1e-6)[0]
    assert differs.tolist() == [0, 187]
    with pytest.raises(ValueError, match="pad_mode"):
        log_stft(wave, pad_mode="edge")
    with pytest.raises(ValueError, match="reflect padding needs more than"):
        log_stft(wave[:100], pad_mode="reflect")


@pytest.mark.parametrize(("rate", "pad_mode"), [(22050, "constant"), (16000, "reflect")])
def test_stft_matches_kaldi_native_fbank(rate, pad_mode):
    knf = pytest.importorskip("kaldi_native_fbank")
    wave = chirp_with_noise(rate)
    config = knf.StftConfig(
        n_fft=512, hop_length=353, win_length=512, window_type="hann", pad_mode=pad_mode
    )
    result = knf.Stft(config)(wave.tolist())
    real = np.asarray(result.real).reshape(result.num_frames, -1)
    imag = np.asarray(result.imag).reshape(result.num_frames, -1)
    reference = np.log(np.hypot(real, imag) + 1e-7).T
    ours = log_stft(wave, n_fft=512, hop=353, pad_mode=pad_mode)[0].numpy()
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() < STFT_KALDI_ATOL
