"""CREMA-D: acted emotional speech, audio + face video, 6 classes (7442 clips, 91 actors).

Source: H. Cao, D. G. Cooper, M. K. Keutmann, R. C. Gur, A. Nenkova, R. Verma, "CREMA-D:
Crowd-sourced Emotional Multimodal Actors Dataset", IEEE Trans. Affective Computing 5(4),
2014; https://github.com/CheyneyComputerScience/CREMA-D, Open Database License v1.0
(contents: Database Contents License v1.0). The train / test split is the one of OGM-GE
(Peng et al., CVPR 2022): ``train.csv`` / ``test.csv`` with rows ``clip,LABEL`` (6698 /
744 clips). The test list ships with equimodal (``data/files/cremad_ogmge_test.csv``, from
github.com/GeWu-Lab/OGM-GE_CVPR2022, MIT licence); without split files in the raw folder
train is every other clip, so the split is reproducible from the download alone.

Raw layout (``equimodal prepare cremad --raw RAW --out ROOT``)::

    RAW/AudioWAV/<clip>.wav                       16 kHz mono speech
    RAW/Image-01-FPS/<clip>/*.jpg                 frames at 1 fps (OGM-GE layout), or
    RAW/VideoFlash/<clip>.flv                     the videos, sampled at ``fps`` by ffmpeg
    RAW/train.csv, RAW/test.csv                   (or data.csv + test.csv: train = the rest)

Audio follows OGM-GE: the wav is resampled to 22050 Hz, tiled or cut to 3 s (66150
samples), clipped to [-1, 1], and turned into ``log(|STFT| + 1e-7)`` with n_fft 512, hop
353 and a Hann window: 257 frequencies x (1 + 66150 // 353) = 188 frames. (At the native
16 kHz it would be 257 x 136.) Frames: 1 fps; the loader takes ``num_frames`` (default 1,
as OGM-GE) evenly spaced frames, random within their segment when training.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from equimodal.data.audio import fix_length, log_stft, read_wav, resample, stft_frames
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

CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")  # OGM-GE's class ids 0..5
SPLIT_FILES = {"train": "train.csv", "test": "test.csv"}
#: OGM-GE's CREMA-D test list (744 clips; github.com/GeWu-Lab/OGM-GE_CVPR2022, MIT licence)
PACKAGED_TEST_SPLIT = Path(__file__).parent / "files" / "cremad_ogmge_test.csv"
INFO = DatasetInfo(
    name="cremad",
    modalities=(
        ModalitySpec("audio", (1, 257, 188), "spectrogram"),
        ModalitySpec("visual", (1, 3, 224, 224), "frames"),
    ),
    num_classes=6,
    num_samples=7442,
    source=(
        "CREMA-D (Cao et al., IEEE TAC 2014), github.com/CheyneyComputerScience/CREMA-D; "
        "OGM-GE train/test split; needs `equimodal prepare cremad`"
    ),
    license="Open Database License v1.0 (contents: Database Contents License v1.0)",
    description="acted emotions: speech spectrogram and face frames, 6 classes",
    class_names=CLASSES,
)


def read_split_file(path: Path) -> tuple[list[str], list[int], list[str]]:
    """``(clips, class ids, lines)`` of a CREMA-D split file with rows ``clip,LABEL``."""
    if not path.is_file():
        raise FileNotFoundError(f"CREMA-D split file {str(path)!r} does not exist")
    clips, labels, lines = [], [], []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        for number, row in enumerate(csv.reader(fh), start=1):
            if not row or not row[0].strip():
                continue
            if len(row) < 2 or row[1].strip() not in CLASSES:
                got = row[1].strip() if len(row) > 1 else "nothing"
                raise ValueError(
                    f"{str(path)!r} line {number}: expected clip,LABEL with LABEL one of "
                    f"{' '.join(CLASSES)}, got {got!r}"
                )
            clips.append(row[0].strip())
            labels.append(CLASSES.index(row[1].strip()))
            lines.append(",".join(cell.strip() for cell in row))
    return clips, labels, lines


@register_dataset(INFO)
def load_cremad(
    *,
    seed: int = 0,
    root: str | None = None,
    num_frames: int = 1,
    frame_size: int = 224,
    audio_seconds: float | None = None,
    val_fraction: float = 0.1,
    num_workers: int | str = "auto",
    max_items: int | None = None,
    augment: bool = True,
) -> MultimodalData:
    """CREMA-D from a folder written by ``equimodal prepare cremad``.

    ``num_frames`` frames per clip (default 1, as OGM-GE) at ``frame_size`` pixels;
    ``audio_seconds`` keeps the first ``1 + seconds * sample_rate / hop`` spectrogram
    frames (default: all that were prepared, 3 s); validation is a stratified
    ``val_fraction`` of train for ``seed``; ``augment`` applies a random resized crop and
    horizontal flip to training frames; ``max_items`` keeps the first items of each split
    file (quick runs).
    """
    base = prepared_root(root, "cremad")
    meta = read_prepare_json(base, "cremad")
    settings = meta["settings"]
    names: dict[str, list[str]] = {}
    labels: dict[str, list[int]] = {}
    for split, filename in SPLIT_FILES.items():
        if not (base / filename).is_file():
            raise FileNotFoundError(
                f"{str(base / filename)!r} does not exist; {prepare_hint('cremad', root)}"
            )
        names[split], labels[split], _ = read_split_file(base / filename)
    return build_av_data(
        INFO,
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


class CremadPrepareOptions(BaseModel):
    """Options of ``equimodal prepare cremad`` (``-o key=value``)."""

    model_config = ConfigDict(extra="forbid")

    audio_dir: str = "AudioWAV"
    #: folder of existing frame folders; default ``Image-<fps:02d>-FPS`` (OGM-GE's name)
    frames_dir: str | None = None
    video_dir: str = "VideoFlash"
    train_split: str = "train.csv"
    test_split: str = "test.csv"
    sample_rate: int = Field(22050, gt=0)
    seconds: float = Field(3.0, gt=0)
    n_fft: int = Field(512, gt=1)
    hop: int = Field(353, gt=0)
    window: str = "hann"
    fps: float = Field(1.0, gt=0)
    #: shorter side of stored frames in pixels (None keeps the source size)
    frame_size: int | None = Field(None, gt=0)
    workers: int = Field(1, gt=0)
    strict: bool = False
    overwrite: bool = False


def clip_label(clip: str) -> int:
    """Class id of a CREMA-D clip from its name ``actor_sentence_EMOTION_level``."""
    parts = clip.split("_")
    if len(parts) < 3 or parts[2] not in CLASSES:
        raise ValueError(
            f"CREMA-D clip name {clip!r} does not carry an emotion "
            f"(expected actor_sentence_EMOTION_level with EMOTION one of {' '.join(CLASSES)})"
        )
    return CLASSES.index(parts[2])


def _split_from_clips(clips: list[str]) -> tuple[list[str], list[int], list[str]]:
    labels = [clip_label(clip) for clip in clips]
    return clips, labels, [f"{c},{CLASSES[y]}" for c, y in zip(clips, labels, strict=True)]


def _read_or_derive_splits(
    raw: Path, opts: CremadPrepareOptions
) -> tuple[dict[str, tuple[list[str], list[int], list[str]]], list[str]]:
    """The train / test split: the raw folder's files when present, else derived.

    Test falls back to OGM-GE's list shipped with equimodal; train to ``data.csv`` minus
    test, or else to every wav in the audio folder that is not in test (the label comes
    from the clip name), which reproduces OGM-GE's 6698 / 744 split of the full download.
    """
    notes: list[str] = []
    if (raw / opts.test_split).is_file():
        test = read_split_file(raw / opts.test_split)
    else:
        shipped = read_split_file(PACKAGED_TEST_SPLIT)
        present = {p.stem for p in (raw / opts.audio_dir).glob("*.wav")}
        keep = [i for i, clip in enumerate(shipped[0]) if clip in present]
        if not keep:
            raise FileNotFoundError(
                f"{str(raw / opts.test_split)!r} does not exist and none of the "
                f"{len(shipped[0])} clips of OGM-GE's test list has a wav in "
                f"{str(raw / opts.audio_dir)!r}; put train.csv and test.csv in the raw folder "
                "(docs/datasets_audio_visual.md)"
            )
        test = tuple([part[i] for i in keep] for part in shipped)
        notes.append(
            f"{opts.test_split} not found: test is OGM-GE's list shipped with equimodal "
            f"({len(keep)} of its {len(shipped[0])} clips have a wav here)"
        )
    held = set(test[0])
    train_path = raw / opts.train_split
    if train_path.is_file():
        train = read_split_file(train_path)
    elif (raw / "data.csv").is_file():
        every = read_split_file(raw / "data.csv")
        keep = [i for i, clip in enumerate(every[0]) if clip not in held]
        train = tuple([part[i] for i in keep] for part in every)
        notes.append(
            f"{opts.train_split} not found: train is data.csv minus {opts.test_split} "
            f"({len(keep)} clips)"
        )
    else:
        audio_dir = raw / opts.audio_dir
        if not audio_dir.is_dir():
            raise FileNotFoundError(
                f"CREMA-D audio folder {str(audio_dir)!r} does not exist; the raw folder "
                "needs AudioWAV/ (docs/datasets_audio_visual.md)"
            )
        clips = sorted(p.stem for p in audio_dir.glob("*.wav") if p.stem not in held)
        train = _split_from_clips(clips)
        notes.append(
            f"{opts.train_split} not found: train is every wav in {opts.audio_dir} not in "
            f"the test list ({len(clips)} clips)"
        )
    return {"train": train, "test": test}, notes  # type: ignore[dict-item]


@register_preparer("cremad")
def prepare_cremad(raw: Path, out: Path, progress: bool = True, **options: Any) -> PrepareSummary:
    """Raw CREMA-D (wav + frames or videos) -> log-STFT ``.npy`` files and jpg frames."""
    opts = check_options(CremadPrepareOptions, options, "prepare cremad")
    log_stft(np.zeros(8, dtype=np.float32), n_fft=opts.n_fft, hop=opts.hop, window=opts.window)
    splits, notes = _read_or_derive_splits(raw, opts)
    samples = int(round(opts.seconds * opts.sample_rate))
    shape = (1, opts.n_fft // 2 + 1, stft_frames(samples, opts.hop))
    settings = {
        "sample_rate": opts.sample_rate,
        "seconds": opts.seconds,
        "n_fft": opts.n_fft,
        "hop": opts.hop,
        "window": opts.window,
        "fps": opts.fps,
        "frame_size": opts.frame_size,
        "audio_shape": list(shape),
        "frame_rate": opts.sample_rate / opts.hop,
    }
    audio_dir = raw / opts.audio_dir
    if opts.frames_dir is not None:
        frames_dirs = [raw / opts.frames_dir]
    elif float(opts.fps).is_integer():
        frames_dirs = [raw / f"Image-{int(opts.fps):02d}-FPS"]
    else:
        frames_dirs = []
    video_dirs = [raw / opts.video_dir]

    clips = list(dict.fromkeys(splits["train"][0] + splits["test"][0]))
    needs_video = any(
        (opts.overwrite or not list_frames(out / "visual" / clip))
        and find_frame_folder(clip, frames_dirs) is None
        and find_source(clip, video_dirs, VIDEO_SUFFIXES) is not None
        for clip in clips
    )
    if needs_video:
        find_ffmpeg()  # the one-line hint before any work, not one failure per clip
    write_prepare_json(out, "cremad", settings, opts.overwrite)
    remove_partials(out)

    def work(clip: str) -> bool:
        wrote = False
        target = out / "audio" / f"{clip}.npy"
        if opts.overwrite or npy_shape(target) != shape:
            wav = audio_dir / f"{clip}.wav"
            if not wav.is_file():
                raise FileNotFoundError(f"no audio: {str(wav)!r} does not exist")
            wave, rate = read_wav(wav)
            wave = fix_length(
                resample(wave, rate, opts.sample_rate), opts.sample_rate, opts.seconds
            )
            spec = log_stft(np.clip(wave, -1.0, 1.0), opts.n_fft, opts.hop, opts.window)
            save_npy(target, spec.numpy())
            wrote = True
        frames_out = out / "visual" / clip
        if opts.overwrite or not list_frames(frames_out):
            folder = find_frame_folder(clip, frames_dirs)
            if folder is not None:
                copy_frames(folder, frames_out, opts.frame_size)
            else:
                video = find_source(clip, video_dirs, VIDEO_SUFFIXES)
                if video is None:
                    where = " or ".join(str(d / clip) for d in frames_dirs + video_dirs)
                    raise FileNotFoundError(f"no frames or video: nothing at {where}.*")
                extract_frames(video, frames_out, opts.fps, opts.frame_size)
            wrote = True
        return wrote

    written, skipped, failures = run_items(
        "cremad", clips, work, progress, workers=opts.workers, strict=opts.strict
    )
    for split, filename in SPLIT_FILES.items():
        kept = [
            line
            for clip, line in zip(splits[split][0], splits[split][2], strict=True)
            if clip not in failures
        ]
        write_text_file(out / filename, kept)
    notes += failure_notes(out, failures, len(clips))
    return PrepareSummary("cremad", written=written, skipped=skipped, notes=notes)
