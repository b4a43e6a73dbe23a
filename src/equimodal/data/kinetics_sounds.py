"""Kinetics-Sounds: the Kinetics-400 classes that can be heard, audio + video frames.

Source: R. Arandjelovic, A. Zisserman, "Look, Listen and Learn", ICCV 2017 (the subset);
W. Kay et al., "The Kinetics Human Action Video Dataset", arXiv:1705.06950 (the clips:
10 s YouTube excerpts; annotations CC BY 4.0, videos under their owners' terms). The
balance literature (OGM-GE, PMR, AGM, MLA, BalanceBenchmark) uses 31 classes; the class
list is taken from the split files (their labels), so 32- or 34-class lists work too.

Split files, one clip per line, the clip name first and the label last:
OGM-GE's ``my_train.txt`` / ``my_test.txt`` (``name,10,label``, comma-separated) or
BalanceBenchmark's ``ks_train_overlap.txt`` / ``ks_test_overlap.txt`` (space-separated).
Integer labels are class ids (names from an optional ``classes.txt``, one per line);
text labels are numbered in sorted order.

Raw layout (``equimodal prepare kinetics_sounds --raw RAW --out ROOT``; every folder
option takes a comma-separated list, e.g. ``-o audio_dir=train_spec,test_spec``)::

    RAW/my_train.txt, RAW/my_test.txt   (or train.txt / ks_train_overlap.txt, ...)
    RAW/audio/<name>.npy                a 128-bin fbank (T x 128) as OGM-GE writes it,
    RAW/audio/<name>.wav                or the sound, or the sound track of the video
    RAW/visual/<name>/*.jpg             frames, or
    RAW/video/<name>.mp4                the clip, sampled at ``fps`` by ffmpeg

Audio follows OGM-GE's Kinetics-Sounds preprocessing (the AST front end): a Kaldi-style
log mel filterbank, 128 bins, 25 ms frames every 10 ms at 16 kHz, zero-padded or cut to
1024 frames, normalised as ``(x + 4.503877) / (2 * 5.141276)``; stored as 1 x 128 x 1024.
Existing ``.npy`` fbanks are copied as they are (transposed to mel x time, padded or cut to
1024 frames). Frames: 1 fps; the loader takes ``num_frames`` (default 3, as OGM-GE and
BalanceBenchmark) evenly spaced frames, random within their segment when training.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from equimodal.data.audio import extract_audio, log_mel_fbank, read_wav, resample
from equimodal.data.base import DatasetInfo, ModalitySpec, MultimodalData
from equimodal.data.frames import (
    VIDEO_SUFFIXES,
    copy_frames,
    extract_frames,
    find_ffmpeg,
    find_frame_folder,
    list_frames,
)
from equimodal.data.loaders import build_av_data, prepared_root
from equimodal.data.prepare import (
    PrepareSummary,
    check_options,
    failure_notes,
    find_source,
    folder_list,
    npy_shape,
    prepare_hint,
    read_prepare_json,
    register_preparer,
    remove_partials,
    run_items,
    save_npy,
    write_prepare_json,
    write_text_file,
)
from equimodal.data.registry import register_dataset

SPLIT_FILES = {"train": "train.txt", "test": "test.txt"}
SPLIT_CANDIDATES = {
    "train": ("train.txt", "my_train.txt", "ks_train_overlap.txt"),
    "test": ("test.txt", "my_test.txt", "ks_test_overlap.txt"),
}
CLASSES_FILE = "classes.txt"
NAME_SUFFIXES = (*VIDEO_SUFFIXES, ".wav", ".npy")
INFO = DatasetInfo(
    name="kinetics_sounds",
    modalities=(
        ModalitySpec("audio", (1, 128, 1024), "spectrogram"),
        ModalitySpec("visual", (3, 3, 224, 224), "frames"),
    ),
    num_classes=31,
    # 0: depends on the copy (YouTube videos disappear); OGM-GE's lists hold about 15k
    # train and 1.8k test clips
    num_samples=0,
    source=(
        "Kinetics-Sounds (Arandjelovic & Zisserman, ICCV 2017) from Kinetics-400 (Kay et al. "
        "2017); OGM-GE / BalanceBenchmark lists (~15k train, ~1.8k test clips); needs "
        "`equimodal prepare kinetics_sounds`"
    ),
    license="annotations CC BY 4.0; videos: YouTube, their owners' terms",
    description="audio fbank and video frames of 31 audible Kinetics classes",
)


def _strip_suffix(name: str) -> str:
    for suffix in NAME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_split_file(path: Path) -> tuple[list[str], list[str], list[str]]:
    """``(names, label tokens, lines)`` of a split list: name first, label last.

    Comma-separated lines (OGM-GE) and whitespace-separated lines (BalanceBenchmark) are
    both read; a file extension on the name is dropped.
    """
    if not path.is_file():
        raise FileNotFoundError(f"Kinetics-Sounds split file {str(path)!r} does not exist")
    names, tokens, lines = [], [], []
    with open(path, encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            text = line.strip()
            if not text:
                continue
            fields = [f.strip() for f in text.split(",")] if "," in text else text.split()
            if len(fields) < 2 or not fields[0] or not fields[-1]:
                raise ValueError(
                    f"{str(path)!r} line {number}: expected a clip name and a label, got {text!r}"
                )
            names.append(_strip_suffix(fields[0]))
            tokens.append(fields[-1])
            lines.append(text)
    return names, tokens, lines


def _drop_header(
    parsed: tuple[list[str], list[str], list[str]],
) -> tuple[list[str], list[str], list[str]]:
    names, tokens, lines = parsed
    numeric = [t.lstrip("-").isdigit() for t in tokens]
    if len(tokens) > 1 and not numeric[0] and all(numeric[1:]):  # a header line
        return names[1:], tokens[1:], lines[1:]
    return parsed


def class_ids(
    tokens: dict[str, list[str]], where: str, names_file: Path | None
) -> tuple[dict[str, list[int]], tuple[str, ...]]:
    """Class ids per split and the class names, from the label tokens of the split files."""
    every = [t for split in tokens.values() for t in split]
    numeric = [t.lstrip("-").isdigit() for t in every]
    if all(numeric):
        ids = {split: [int(t) for t in values] for split, values in tokens.items()}
        low = min((min(v) for v in ids.values() if v), default=0)
        if low < 0:
            raise ValueError(f"{where}: a label is negative ({low})")
        count = 1 + max((max(v) for v in ids.values() if v), default=0)
        names: tuple[str, ...] = tuple(str(i) for i in range(count))
        if names_file is not None and names_file.is_file():
            listed = [x.strip() for x in names_file.read_text(encoding="utf-8").splitlines()]
            listed = [x for x in listed if x]
            if len(listed) < count:
                raise ValueError(
                    f"{str(names_file)!r} names {len(listed)} classes but the labels go up "
                    f"to {count - 1}"
                )
            names = tuple(listed)
        return ids, names
    if any(numeric):
        first = every[numeric.index(True)]
        raise ValueError(f"{where}: labels mix numbers ({first!r}) and names")
    names = tuple(sorted(set(every)))
    return {split: [names.index(t) for t in values] for split, values in tokens.items()}, names


@register_dataset(INFO)
def load_kinetics_sounds(
    *,
    seed: int = 0,
    root: str | None = None,
    num_frames: int = 3,
    frame_size: int = 224,
    audio_seconds: float | None = None,
    val_fraction: float = 0.1,
    num_workers: int | str = "auto",
    max_items: int | None = None,
    augment: bool = True,
) -> MultimodalData:
    """Kinetics-Sounds from a folder written by ``equimodal prepare kinetics_sounds``.

    ``num_frames`` frames per clip (default 3, as OGM-GE) at ``frame_size`` pixels;
    ``audio_seconds`` keeps the first ``1 + 100 * seconds`` fbank frames (default: all
    1024); validation is a stratified ``val_fraction`` of train for ``seed``;
    ``augment`` applies a random resized crop and horizontal flip to training frames;
    ``max_items`` keeps the first items of each split file (quick runs).
    """
    base = prepared_root(root, "kinetics_sounds")
    meta = read_prepare_json(base, "kinetics_sounds")
    settings = meta["settings"]
    names: dict[str, list[str]] = {}
    tokens: dict[str, list[str]] = {}
    for split, filename in SPLIT_FILES.items():
        if not (base / filename).is_file():
            raise FileNotFoundError(
                f"{str(base / filename)!r} does not exist; {prepare_hint('kinetics_sounds', root)}"
            )
        names[split], tokens[split], _ = _drop_header(read_split_file(base / filename))
    labels, class_names = class_ids(tokens, f"split files in {str(base)!r}", base / CLASSES_FILE)
    info = replace(INFO, num_classes=len(class_names), class_names=class_names)
    return build_av_data(
        info,
        base,
        names,
        labels,
        tuple(settings["audio_shape"]),
        float(settings["frame_rate"]),
        seed=seed,
        num_frames=num_frames,
        frame_size=frame_size,
        audio_seconds=audio_seconds,
        val_fraction=val_fraction,
        num_workers=num_workers,
        max_items=max_items,
        augment=augment,
    )


class KineticsSoundsPrepareOptions(BaseModel):
    """Options of ``equimodal prepare kinetics_sounds`` (``-o key=value``)."""

    model_config = ConfigDict(extra="forbid")

    #: split lists; default: the first of train.txt, my_train.txt, ks_train_overlap.txt
    train_split: str | None = None
    test_split: str | None = None
    classes_file: str = CLASSES_FILE
    audio_dir: str | list[str] = "audio"
    frames_dir: str | list[str] = "visual"
    video_dir: str | list[str] = "video"
    sample_rate: int = Field(16000, gt=0)
    n_mels: int = Field(128, gt=0)
    target_frames: int = Field(1024, gt=0)
    norm_mean: float = -4.503877
    norm_std: float = Field(5.141276, gt=0)
    #: axis order of existing fbank .npy files: (time, mel) as OGM-GE writes them
    npy_layout: Literal["time_mel", "mel_time"] = "time_mel"
    fps: float = Field(1.0, gt=0)
    #: shorter side of stored frames in pixels (None keeps the source size)
    frame_size: int | None = Field(None, gt=0)
    workers: int = Field(1, gt=0)
    strict: bool = False
    overwrite: bool = False


def _split_path(raw: Path, given: str | None, split: str) -> Path:
    if given is not None:
        path = raw / given
        if not path.is_file():
            raise FileNotFoundError(f"Kinetics-Sounds split file {str(path)!r} does not exist")
        return path
    for name in SPLIT_CANDIDATES[split]:
        if (raw / name).is_file():
            return raw / name
    raise FileNotFoundError(
        f"no {split} split list in {str(raw)!r} (looked for "
        f"{', '.join(SPLIT_CANDIDATES[split])}); name it with -o {split}_split=FILE"
    )


def _fit_frames(fbank: np.ndarray, frames: int) -> np.ndarray:
    """``(1, n_mels, T)`` zero-padded or cut to ``frames`` time frames."""
    t = fbank.shape[-1]
    if t >= frames:
        return fbank[..., :frames]
    return np.pad(fbank, ((0, 0), (0, 0), (0, frames - t)))


@register_preparer("kinetics_sounds")
def prepare_kinetics_sounds(
    raw: Path, out: Path, progress: bool = True, **options: Any
) -> PrepareSummary:
    """Raw Kinetics-Sounds (fbank / wav / video + frames / video) -> ``.npy`` and jpg frames."""
    opts = check_options(KineticsSoundsPrepareOptions, options, "prepare kinetics_sounds")
    paths = {
        split: _split_path(raw, given, split)
        for split, given in (("train", opts.train_split), ("test", opts.test_split))
    }
    parsed = {split: _drop_header(read_split_file(path)) for split, path in paths.items()}
    class_ids(
        {split: p[1] for split, p in parsed.items()},
        "the split lists",
        raw / opts.classes_file,
    )
    shape = (1, opts.n_mels, opts.target_frames)
    hop = int(round(0.010 * opts.sample_rate))
    settings = {
        "sample_rate": opts.sample_rate,
        "n_mels": opts.n_mels,
        "target_frames": opts.target_frames,
        "norm_mean": opts.norm_mean,
        "norm_std": opts.norm_std,
        "npy_layout": opts.npy_layout,
        "fps": opts.fps,
        "frame_size": opts.frame_size,
        "audio_shape": list(shape),
        "frame_rate": opts.sample_rate / hop,
    }
    audio_dirs = folder_list(raw, opts.audio_dir)
    frames_dirs = folder_list(raw, opts.frames_dir)
    video_dirs = folder_list(raw, opts.video_dir)

    names = list(dict.fromkeys(parsed["train"][0] + parsed["test"][0]))

    def audio_pending(name: str) -> bool:
        return opts.overwrite or npy_shape(out / "audio" / f"{name}.npy") != shape

    def frames_pending(name: str) -> bool:
        return opts.overwrite or not list_frames(out / "visual" / name)

    def needs_video(name: str) -> bool:
        if find_source(name, video_dirs, VIDEO_SUFFIXES) is None:
            return False
        no_audio = find_source(name, audio_dirs, (".npy", ".wav")) is None
        no_frames = find_frame_folder(name, frames_dirs) is None
        return (audio_pending(name) and no_audio) or (frames_pending(name) and no_frames)

    if any(needs_video(name) for name in names):
        find_ffmpeg()  # the one-line hint before any work, not one failure per clip
    write_prepare_json(out, "kinetics_sounds", settings, opts.overwrite)
    remove_partials(out)

    def fbank_of(wave: np.ndarray) -> np.ndarray:
        wave = wave - wave.mean()
        fbank = log_mel_fbank(wave, opts.sample_rate, n_mels=opts.n_mels).numpy()
        return (_fit_frames(fbank, opts.target_frames) - opts.norm_mean) / (2 * opts.norm_std)

    def work(name: str) -> bool:
        wrote = False
        target = out / "audio" / f"{name}.npy"
        if audio_pending(name):
            source = find_source(name, audio_dirs, (".npy", ".wav"))
            if source is not None and source.suffix == ".npy":
                try:
                    fbank = np.load(source, allow_pickle=False).astype(np.float32)
                except (OSError, ValueError, EOFError) as err:
                    reason = err or type(err).__name__
                    raise ValueError(f"cannot read fbank {str(source)!r}: {reason}") from None
                fbank = fbank.reshape(fbank.shape[-2:]) if fbank.ndim == 3 else fbank
                if fbank.ndim != 2:
                    raise ValueError(f"fbank {str(source)!r} has shape {fbank.shape}, not 2-D")
                fbank = fbank.T if opts.npy_layout == "time_mel" else fbank
                if fbank.shape[0] != opts.n_mels:
                    raise ValueError(
                        f"fbank {str(source)!r} has {fbank.shape[0]} mel bins, not "
                        f"{opts.n_mels} (npy_layout {opts.npy_layout})"
                    )
                fbank = _fit_frames(fbank[None], opts.target_frames)
            else:
                if source is not None:
                    wave, rate = read_wav(source)
                    wave = resample(wave, rate, opts.sample_rate)
                else:
                    video = find_source(name, video_dirs, VIDEO_SUFFIXES)
                    if video is None:
                        where = " or ".join(str(d / name) for d in audio_dirs + video_dirs)
                        raise FileNotFoundError(f"no audio: nothing at {where}.*")
                    wave = extract_audio(video, opts.sample_rate)
                fbank = fbank_of(wave)
            save_npy(target, fbank)
            wrote = True
        if frames_pending(name):
            folder = find_frame_folder(name, frames_dirs)
            if folder is not None:
                copy_frames(folder, out / "visual" / name, opts.frame_size)
            else:
                video = find_source(name, video_dirs, VIDEO_SUFFIXES)
                if video is None:
                    where = " or ".join(str(d / name) for d in frames_dirs + video_dirs)
                    raise FileNotFoundError(f"no frames or video: nothing at {where}.*")
                extract_frames(video, out / "visual" / name, opts.fps, opts.frame_size)
            wrote = True
        return wrote

    written, skipped, failures = run_items(
        "kinetics_sounds", names, work, progress, workers=opts.workers, strict=opts.strict
    )
    for split, filename in SPLIT_FILES.items():
        names_, _, lines = parsed[split]
        kept = [line for name, line in zip(names_, lines, strict=True) if name not in failures]
        write_text_file(out / filename, kept)
    notes = [f"split lists: {paths['train'].name}, {paths['test'].name}"]
    if (raw / opts.classes_file).is_file():
        write_text_file(
            out / CLASSES_FILE,
            [x.strip() for x in (raw / opts.classes_file).read_text().splitlines() if x.strip()],
        )
    notes += failure_notes(out, failures, len(names))
    return PrepareSummary("kinetics_sounds", written=written, skipped=skipped, notes=notes)
