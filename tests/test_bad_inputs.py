"""Bad inputs (issue 7, part 2): each one is refused clearly, and nothing half-made stays.

Every row of the table is one bad input. The library call that meets it raises exactly
the listed exception class with a message naming what is wrong (the file, row, modality
or key); the CLI prints that message as one ``error:`` line, exits with code 2, shows no
traceback, and leaves no partial run folder (the watched folder does not appear, or is
byte-for-byte unchanged).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from equimodal.apps.cli import app
from equimodal.config import ConfigError, build_config, load_yaml
from equimodal.core.files import write_bytes_atomic, write_text_atomic
from equimodal.engine.checkpoint import CheckpointError, read_checkpoint

from .av_fixtures import CREMAD_CLASSES, class_color, write_jpg, write_wav
from .conftest import small_overrides

runner = CliRunner()
SMALL = [x for o in small_overrides("joint", epochs=1) for x in ("--set", o)]
#: the same without the synthetic dataset, for rows that bring their own data
TINY = [x for o in small_overrides("joint", epochs=1)[2:] for x in ("--set", o)]
N = 60  # rows of the feature datasets
CLASSES = ("cat", "dog", "owl")


# --------------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class Bad:
    """One bad input: the CLI call, the library call, what both must say."""

    argv: list[str]
    exc: type[BaseException]
    fragment: str
    library: Callable[[], object] | None = None
    #: folder that must not appear, or must stay unchanged (default: the --out folder)
    watch: Path | None = None
    #: what the library's message must hold, where it differs from the CLI's
    library_fragment: str | None = None
    #: met after training began: the run folder is kept (nothing trained is deleted)
    kept: bool = False


@dataclass
class Ctx:
    """What a case builder gets: a fresh folder, the shared run and the monkeypatch."""

    tmp: Path
    run: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.tmp / "runs"

    def train(self, *args: object, base: list[str] = SMALL) -> list[str]:
        """``equimodal train`` into ``self.out``: a tiny config, then ``args``."""
        return ["train", "-q", "--out", str(self.out), *base, *map(str, args)]

    def evaluate_copy(self) -> Path:
        """A private copy of the shared trained run (cases damage it)."""
        return Path(shutil.copytree(self.run, self.tmp / "run"))


def snapshot(folder: Path | None) -> dict[str, bytes | None] | None:
    """Every path under ``folder`` with its bytes (None: a folder); None if absent."""
    if folder is None or not folder.exists():
        return None
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def write_features(root: Path, split: list[str] | None = None) -> np.ndarray:
    """A features-dataset folder: a.npy (4 columns), b.npy (3), labels.txt, split.txt."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = np.arange(N) % 3
    np.save(root / "a.npy", rng.normal(size=(N, 4)) + labels[:, None])
    np.save(root / "b.npy", rng.normal(size=(N, 3)))
    (root / "labels.txt").write_text("\n".join(CLASSES[k] for k in labels) + "\n")
    if split is not None:
        (root / "split.txt").write_text("\n".join(split) + "\n")
    return labels


def features_case(ctx: Ctx, damage, exc, fragment, split=None, *options: str) -> Bad:
    """A features dataset damaged by ``damage(root)``, loaded by the library and the CLI."""
    from equimodal.data.registry import load_dataset

    root = ctx.tmp / "data"
    labels = write_features(root, split(np.arange(N) % 3) if split else None)
    damage(root, labels)
    extra = dict(o.split("=", 1) for o in options)
    sets = [x for o in options for x in ("--set", f"dataset.options.{o}")]
    return Bad(
        ctx.train(
            "--set",
            "dataset.name=features",
            "--set",
            f"dataset.options.root={root}",
            *sets,
            base=TINY,
        ),
        exc,
        fragment.format(root=root),
        lambda: load_dataset(
            "features", root=str(root), **{k: v == "true" for k, v in extra.items()}
        ),
    )


def poke(root: Path, row, col, value) -> None:
    a = np.load(root / "a.npy")
    a[row, col] = value
    np.save(root / "a.npy", a)


def write_cremad(root: Path, per_class: int = 2) -> list[str]:
    """A prepared CREMA-D folder written by hand (tiny spectrograms and 12-pixel frames)."""
    rng = np.random.default_rng(0)
    (root / "audio").mkdir(parents=True)
    rows: dict[str, list[str]] = {"train": [], "test": []}
    k = 0
    for split, count in (("train", per_class), ("test", 1)):
        for label, emotion in enumerate(CREMAD_CLASSES):
            for _ in range(count):
                clip = f"{1001 + k}_IEO_{emotion}_XX"
                k += 1
                spec = rng.normal(size=(1, 8, 12)) + label
                np.save(root / "audio" / f"{clip}.npy", spec.astype(np.float32))
                write_jpg(root / "visual" / clip / "frame_00001.jpg", class_color(label), (12, 12))
                rows[split].append(f"{clip},{emotion}")
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    settings = {"audio_shape": [1, 8, 12], "frame_rate": 62.5}
    (root / "prepare.json").write_text(json.dumps({"dataset": "cremad", "settings": settings}))
    return [line.split(",")[0] for line in rows["train"]]


def cremad_case(ctx: Ctx, damage, exc, fragment, *sets: str, library=None) -> Bad:
    """Train on a damaged prepared CREMA-D folder (an MLP per modality, one epoch)."""
    from equimodal.data.registry import load_dataset

    root = ctx.tmp / "cremad"
    clips = write_cremad(root)
    target = damage(root, clips)
    options = [
        "dataset.name=cremad",
        f"dataset.options.root={root}",
        "dataset.options.frame_size=8",
        "dataset.options.val_fraction=0.5",
        "dataset.options.augment=false",
        "train.batch_size=4",
        *sets,
    ]
    return Bad(
        ctx.train(*[x for o in options for x in ("--set", o)], base=TINY),
        exc,
        fragment.format(root=root, target=target),
        library or (lambda: load_dataset("cremad", root=str(root), val_fraction=0.5)),
    )


def write_kinetics(root: Path, train: str, test: str, classes: str | None) -> None:
    """The split files (and classes.txt) of a prepared Kinetics-Sounds folder."""
    root.mkdir(parents=True)
    settings = {"audio_shape": [1, 8, 12], "frame_rate": 100.0}
    (root / "prepare.json").write_text(
        json.dumps({"dataset": "kinetics_sounds", "settings": settings})
    )
    (root / "train.txt").write_text(train)
    (root / "test.txt").write_text(test)
    if classes is not None:
        (root / "classes.txt").write_text(classes)


def kinetics_case(ctx: Ctx, train: str, test: str, classes, exc, fragment) -> Bad:
    from equimodal.data.registry import load_dataset

    root = ctx.tmp / "ks"
    write_kinetics(root, train, test, classes)
    return Bad(
        ctx.train(
            "--set",
            "dataset.name=kinetics_sounds",
            "--set",
            f"dataset.options.root={root}",
            base=TINY,
        ),
        exc,
        fragment.format(root=root),
        lambda: load_dataset("kinetics_sounds", root=str(root)),
    )


def checkpoint_case(ctx: Ctx, damage, exc, fragment, library=None) -> Bad:
    """``equimodal evaluate`` on a copy of the shared run whose files ``damage`` breaks."""
    run = ctx.evaluate_copy()
    ckpt = run / "checkpoints" / "best.safetensors"
    damage(run, ckpt)
    return Bad(
        ["evaluate", str(run)],
        exc,
        fragment.format(ckpt=ckpt),
        library or (lambda: read_checkpoint(ckpt)),
        watch=run,
    )


def resave(ckpt: Path, header_change: Callable[[dict], object] | None) -> None:
    """Rewrite ``ckpt`` with the same tensors and a changed (or no) equimodal header."""
    from safetensors import safe_open
    from safetensors.torch import load, save

    raw = ckpt.read_bytes()
    with safe_open(str(ckpt), "pt") as handle:
        header = json.loads(handle.metadata()["equimodal"])
    metadata = None if header_change is None else {"equimodal": json.dumps(header_change(header))}
    ckpt.write_bytes(save(load(raw), metadata=metadata))


class DiskBudget:
    """A disk that fills up: writes under ``folder`` get ``budget`` bytes in all, then ENOSPC.

    ``os.write`` is wrapped; a write to a file under ``folder`` that crosses the budget
    writes what still fits (a partial write, as a real full disk does) and the next one
    raises ``OSError(ENOSPC)``. Writes elsewhere are untouched.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, folder: Path, budget: int) -> None:
        self.folder = str(folder.resolve())
        self.left = budget
        self.hits = 0
        self._write = os.write
        monkeypatch.setattr(os, "write", self.write)

    def write(self, fd: int, data) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not target.startswith(self.folder + os.sep):
            return self._write(fd, data)
        if self.left <= 0:
            self.hits += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = self._write(fd, bytes(data[: self.left]))
        self.left -= written
        return written


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir(), reason="the disk-full simulation reads /proc/self/fd"
)


# --------------------------------------------------------------------------- the table
def unknown_dataset(ctx: Ctx) -> Bad:
    from equimodal.core.registry import UnknownNameError
    from equimodal.data.registry import load_dataset

    return Bad(
        ctx.train("--set", "dataset.name=mfet"),
        UnknownNameError,  # a KeyError (and a ValueError) naming the closest name
        "unknown dataset 'mfet'; did you mean 'mfeat'?",
        lambda: load_dataset("mfet"),
    )


def unknown_strategy(ctx: Ctx) -> Bad:
    return Bad(
        ctx.train("--set", "strategy.name=shapley_alternate"),
        ConfigError,
        "unknown strategy 'shapley_alternate'; did you mean 'shapley_alternating'?",
        lambda: build_config({}, ["strategy.name=shapley_alternate"]),
    )


def unknown_key(ctx: Ctx) -> Bad:
    return Bad(
        ctx.train("--set", "train.colour=red"),
        ConfigError,
        "unknown key 'train.colour'; valid keys: epochs",
        lambda: build_config({}, ["train.colour=red"]),
    )


def mistyped_key(ctx: Ctx) -> Bad:
    return Bad(
        ctx.train("--set", "train.batchsize=8"),
        ConfigError,
        "unknown key 'train.batchsize'; did you mean 'batch_size'?",
        lambda: build_config({}, ["train.batchsize=8"]),
    )


def mistyped_section_in_yaml(ctx: Ctx) -> Bad:
    path = ctx.tmp / "run.yaml"
    path.write_text("trian:\n  epochs: 2\n")
    return Bad(
        ["train", "-q", "--config", str(path), "--out", str(ctx.out)],
        ConfigError,
        "unknown key 'trian'; did you mean 'train'?",
        lambda: build_config(load_yaml(path)),
    )


def unknown_dataset_option(ctx: Ctx) -> Bad:
    from equimodal.data.registry import load_dataset

    return Bad(
        ctx.train("--set", "dataset.options.num_sample=100"),
        TypeError,
        "dataset 'synthetic' has no option 'num_sample'; did you mean 'num_samples'?",
        lambda: load_dataset("synthetic", num_sample=100),
    )


def zero_batch_size(ctx: Ctx) -> Bad:
    return Bad(
        ctx.train("--set", "train.batch_size=0"),
        ConfigError,
        "train.batch_size: Input should be greater than 0 (got 0)",
        lambda: build_config({}, ["train.batch_size=0"]),
    )


def negative_epochs(ctx: Ctx) -> Bad:
    return Bad(
        ctx.train("--set", "train.epochs=-3"),
        ConfigError,
        "train.epochs: Input should be greater than 0 (got -3)",
        lambda: build_config({}, ["train.epochs=-3"]),
    )


def zero_hidden(ctx: Ctx) -> Bad:
    return Bad(
        ctx.train("--set", "model.encoder.hidden=0"),
        ConfigError,
        "encoder 'mlp': hidden: Input should be greater than 0 (got 0)",
        lambda: build_config({}, ["model.encoder.hidden=0"]),
    )


def negative_dim(ctx: Ctx) -> Bad:
    return Bad(
        ctx.train("--set", "model.dim=-8"),
        ConfigError,
        "model.dim: Input should be greater than 0 (got -8)",
        lambda: build_config({}, ["model.dim=-8"]),
    )


def mismatched_rows(ctx: Ctx) -> Bad:
    return features_case(
        ctx,
        lambda r, y: np.save(r / "b.npy", np.ones((N - 1, 3))),
        ValueError,
        "'{root}/b.npy' has 59 rows but '{root}/labels.txt' has 60 labels",
    )


def nan_in_features(ctx: Ctx) -> Bad:
    return features_case(
        ctx, lambda r, y: poke(r, 9, 1, np.nan), ValueError, "'{root}/a.npy': row 9 is partly NaN"
    )


def inf_in_features(ctx: Ctx) -> Bad:
    return features_case(
        ctx,
        lambda r, y: poke(r, 4, 2, -np.inf),
        ValueError,
        "'{root}/a.npy': row 4, column 2 is infinite",
    )


def modality_missing_everywhere(ctx: Ctx) -> Bad:
    # standardize=false: the check must not depend on the training-statistics step
    return features_case(
        ctx,
        lambda r, y: poke(r, slice(None), slice(None), np.nan),
        ValueError,
        "'{root}/a.npy': modality 'a' is absent for every sample (every row is NaN)",
        None,
        "standardize=false",
    )


def modality_masked_everywhere(ctx: Ctx) -> Bad:
    return features_case(
        ctx,
        lambda r, y: np.savez(r / "mask.npz", b=np.zeros(N, dtype=bool)),
        ValueError,
        "'{root}/b.npy': modality 'b' is absent for every sample (mask.npz marks it absent)",
    )


def class_without_training_sample(ctx: Ctx) -> Bad:
    return features_case(
        ctx,
        lambda r, y: None,
        ValueError,
        "'{root}/split.txt': class 'owl' has no training sample",
        lambda y: ["test" if k == 2 else "train" for k in y],
    )


def empty_split(ctx: Ctx) -> Bad:
    return features_case(
        ctx,
        lambda r, y: None,
        ValueError,
        "'{root}/split.txt': the test split is empty (no row says 'test')",
        lambda y: ["train"] * N,
    )


def class_too_small_to_hold_out(ctx: Ctx) -> Bad:
    # one training row per class: no stratified validation split can be drawn
    return features_case(
        ctx,
        lambda r, y: None,
        ValueError,
        "cannot hold out a stratified validation split from the training rows of '{root}' "
        "(val_fraction 0.1): class 'cat' has only 1 row",
        lambda y: ["train"] * 3 + ["test"] * (N - 3),
    )


def single_class(ctx: Ctx) -> Bad:
    def damage(root: Path, labels) -> None:
        (root / "labels.txt").write_text("cat\n" * N)

    return features_case(
        ctx, damage, ValueError, "'{root}/labels.txt': needs at least 2 classes, found 1"
    )


def corrupt_npy(ctx: Ctx) -> Bad:
    def damage(root: Path, labels) -> None:
        (root / "a.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")

    return features_case(ctx, damage, ValueError, "cannot read '{root}/a.npy'")


def empty_npy(ctx: Ctx) -> Bad:
    return features_case(
        ctx, lambda r, y: (r / "b.npy").write_bytes(b""), ValueError, "cannot read '{root}/b.npy'"
    )


def pickled_npy(ctx: Ctx) -> Bad:
    def damage(root: Path, labels) -> None:
        np.save(root / "a.npy", np.array([{"x": 1}] * N, dtype=object), allow_pickle=True)

    return features_case(ctx, damage, ValueError, "cannot read '{root}/a.npy': Object arrays")


def features_root_is_a_file(ctx: Ctx) -> Bad:
    from equimodal.data.registry import load_dataset

    path = ctx.tmp / "data.npy"
    path.write_bytes(b"")
    return Bad(
        ctx.train(
            "--set", "dataset.name=features", "--set", f"dataset.options.root={path}", base=TINY
        ),
        NotADirectoryError,
        f"dataset folder '{path}' is a file; dataset.options.root must be a folder",
        lambda: load_dataset("features", root=str(path)),
    )


def cremad_root_is_a_file(ctx: Ctx) -> Bad:
    from equimodal.data.registry import load_dataset

    path = ctx.tmp / "cremad.zip"
    path.write_bytes(b"PK")
    return Bad(
        ctx.train(
            "--set", "dataset.name=cremad", "--set", f"dataset.options.root={path}", base=TINY
        ),
        NotADirectoryError,
        f"dataset root '{path}' is a file",
        lambda: load_dataset("cremad", root=str(path)),
    )


def labels_out_of_range(ctx: Ctx) -> Bad:
    return kinetics_case(
        ctx,
        "a,10,0\nb,10,1\nc,10,2\n",
        "d,10,1\n",
        "drum\nsing\n",
        ValueError,
        "'{root}/classes.txt' names 2 classes but the labels go up to 2",
    )


def negative_label(ctx: Ctx) -> Bad:
    return kinetics_case(
        ctx,
        "a,10,0\nb,10,-1\n",
        "d,10,1\n",
        None,
        ValueError,
        "split files in '{root}': a label is negative (-1)",
    )


def corrupt_jpg(ctx: Ctx) -> Bad:
    from equimodal.data.frames import load_frames

    def damage(root: Path, clips: list[str]) -> Path:
        path = root / "visual" / clips[0] / "frame_00001.jpg"
        path.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
        return path

    bad = cremad_case(ctx, damage, ValueError, "cannot read image '{target}'")
    path = Path(bad.fragment.split("'")[1])
    return Bad(bad.argv, bad.exc, bad.fragment, lambda: load_frames([path], 8), bad.watch)


def corrupt_jpg_in_a_loader_worker(ctx: Ctx) -> Bad:
    # a DataLoader worker's error would carry the worker's traceback in its message
    bad = corrupt_jpg(ctx)
    return replace(bad, argv=[*bad.argv, "--set", "dataset.options.num_workers=1"])


def corrupt_spectrogram(ctx: Ctx) -> Bad:
    def damage(root: Path, clips: list[str]) -> Path:
        path = root / "audio" / f"{clips[1]}.npy"
        path.write_bytes(path.read_bytes()[:70])  # cut inside the header
        return path

    def library():
        from equimodal.data.registry import load_dataset

        data = load_dataset("cremad", root=str(ctx.tmp / "cremad"), val_fraction=0.5)
        for split in (data.train, data.val):
            for i in range(len(split)):
                split.read_item(i)

    case = cremad_case(
        ctx, damage, ValueError, "cannot read spectrogram '{target}'", library=library
    )
    return replace(case, kept=True)  # the clip is read in the first training epoch


def modality_folder_missing(ctx: Ctx) -> Bad:
    def damage(root: Path, clips: list[str]) -> Path:
        shutil.rmtree(root / "visual")
        return root

    return cremad_case(
        ctx,
        damage,
        FileNotFoundError,
        "18 files of dataset 'cremad' are missing under '{root}'; first: {root}/visual/",
    )


def corrupt_wav(ctx: Ctx) -> Bad:
    pytest.importorskip("soundfile", reason="needs soundfile (pip install 'equimodal[media]')")
    from equimodal.data.audio import read_wav

    raw = ctx.tmp / "raw"
    clip = "1001_IEO_ANG_XX"
    wav = raw / "AudioWAV" / f"{clip}.wav"
    write_wav(wav, 0.5, rate=22050)
    wav.write_bytes(wav.read_bytes()[:20])  # the RIFF header, cut
    write_jpg(raw / "Image-01-FPS" / clip / "frame_00001.jpg", (10, 20, 30))
    (raw / "train.csv").write_text(f"{clip},ANG\n")
    (raw / "test.csv").write_text(f"{clip},ANG\n")
    out = ctx.tmp / "prepared"
    return Bad(
        ["prepare", "cremad", "--raw", str(raw), "--out", str(out), "-q", "-o", "strict=true"],
        ValueError,
        f"cannot read audio file '{wav}'",
        lambda: read_wav(wav),
        watch=out,
    )


def truncated_checkpoint(ctx: Ctx) -> Bad:
    def damage(run: Path, ckpt: Path) -> None:
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])

    return checkpoint_case(
        ctx, damage, CheckpointError, "checkpoint '{ckpt}' is not a readable safetensors file"
    )


def checkpoint_of_another_model(ctx: Ctx) -> Bad:
    from equimodal.engine.trainer import load_run

    def damage(run: Path, ckpt: Path) -> None:
        config = run / "config.yaml"
        config.write_text(config.read_text().replace("dim: 16", "dim: 8"))

    run = ctx.tmp / "run"
    return checkpoint_case(
        ctx,
        damage,
        CheckpointError,
        "checkpoint '{ckpt}' does not fit this model: 'projections.m0.linear.weight' has "
        "shape (16, 32), the model needs (8, 32)",
        library=lambda: load_run(run),
    )


def checkpoint_of_another_version(ctx: Ctx) -> Bad:
    return checkpoint_case(
        ctx,
        lambda run, ckpt: resave(ckpt, lambda h: {**h, "version": 99}),
        CheckpointError,
        "checkpoint '{ckpt}' has format version 99, this equimodal reads version 1",
    )


def checkpoint_of_another_program(ctx: Ctx) -> Bad:
    return checkpoint_case(
        ctx,
        lambda run, ckpt: resave(ckpt, None),
        CheckpointError,
        "checkpoint '{ckpt}' has no equimodal metadata",
    )


def checkpoint_with_corrupt_metadata(ctx: Ctx) -> Bad:
    return checkpoint_case(
        ctx,
        lambda run, ckpt: resave(ckpt, lambda h: {**h, "meta": "?"}),
        CheckpointError,
        "checkpoint '{ckpt}' has corrupt metadata ('meta')",
    )


def output_is_a_file(ctx: Ctx) -> Bad:
    ctx.out.write_text("not a folder")
    return Bad(
        ctx.train(),
        NotADirectoryError,
        f"cannot create run folder '{ctx.out}/synthetic-joint-s0': Not a directory",
        lambda: (ctx.out / "synthetic-joint-s0").mkdir(parents=True),
        library_fragment=f"Not a directory: '{ctx.out}/synthetic-joint-s0'",
    )


def output_not_writable(ctx: Ctx) -> Bad:
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    locked = ctx.tmp / "locked"
    locked.mkdir(mode=0o500)
    return Bad(
        ["train", "-q", "--out", str(locked / "runs"), *SMALL],
        PermissionError,
        f"cannot create run folder '{locked}/runs/synthetic-joint-s0': Permission denied",
        lambda: (locked / "runs").mkdir(),
        watch=locked,
        library_fragment=f"Permission denied: '{locked}/runs'",
    )


def output_not_writable_simulated(ctx: Ctx) -> Bad:
    # the same refusal as a chmod-ed folder, also when the tests run as root
    real_mkdir = Path.mkdir
    out = ctx.out

    def mkdir(self, *args, **kwargs):
        if self == out:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    ctx.monkeypatch.setattr(Path, "mkdir", mkdir)
    return Bad(
        ctx.train(),
        PermissionError,
        f"cannot create run folder '{out}/synthetic-joint-s0': Permission denied",
        lambda: (out / "synthetic-joint-s0").mkdir(parents=True),
        library_fragment=f"Permission denied: '{out}'",
    )


def disk_full(ctx: Ctx) -> Bad:
    # an earlier run in the same folder must survive; the new run fails at its first
    # checkpoint, partway through writing it, and leaves no partial file
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("the disk-full simulation reads /proc/self/fd")
    earlier = ctx.out / "synthetic-joint-s0"
    earlier.mkdir(parents=True)
    write_text_atomic(earlier / "metrics.json", '{"finished": true}\n')
    DiskBudget(ctx.monkeypatch, ctx.out, budget=4096)
    target = ctx.out / "synthetic-joint-s0-2" / "checkpoints" / "best.safetensors"
    probe = ctx.tmp / "probe" / "history.jsonl"

    def library() -> None:
        probe.parent.mkdir()
        DiskBudget(ctx.monkeypatch, probe.parent, budget=1000)
        write_bytes_atomic(probe, b"x" * 10_000)

    return Bad(
        ctx.train(),
        OSError,
        f"cannot write '{target}': No space left on device",
        library,
        kept=True,  # the first checkpoint: training had begun, so the folder stays
    )


CASES = {
    f.__name__: f
    for f in (
        unknown_dataset,
        unknown_strategy,
        unknown_key,
        mistyped_key,
        mistyped_section_in_yaml,
        unknown_dataset_option,
        zero_batch_size,
        negative_epochs,
        zero_hidden,
        negative_dim,
        mismatched_rows,
        nan_in_features,
        inf_in_features,
        modality_missing_everywhere,
        modality_masked_everywhere,
        class_without_training_sample,
        empty_split,
        class_too_small_to_hold_out,
        single_class,
        corrupt_npy,
        empty_npy,
        pickled_npy,
        features_root_is_a_file,
        cremad_root_is_a_file,
        labels_out_of_range,
        negative_label,
        corrupt_jpg,
        corrupt_jpg_in_a_loader_worker,
        corrupt_spectrogram,
        modality_folder_missing,
        corrupt_wav,
        truncated_checkpoint,
        checkpoint_of_another_model,
        checkpoint_of_another_version,
        checkpoint_of_another_program,
        checkpoint_with_corrupt_metadata,
        output_is_a_file,
        output_not_writable,
        output_not_writable_simulated,
        disk_full,
    )
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One finished tiny run (joint, concat, one epoch) that checkpoint cases copy."""
    from equimodal.engine.trainer import Trainer

    run = tmp_path_factory.mktemp("trained") / "run"
    config = build_config({}, [*small_overrides("joint", epochs=1), "train.eval_batch_size=512"])
    Trainer(config, run_dir=run, progress=False).fit()
    return run


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_in_one_line_with_exit_2(name, tmp_path, monkeypatch, request):
    run = request.getfixturevalue("trained_run") if "checkpoint" in name else tmp_path
    ctx = Ctx(tmp_path, run, monkeypatch)
    bad = CASES[name](ctx)
    watch = bad.watch or ctx.out
    if bad.library is not None:
        with pytest.raises(bad.exc) as info:
            bad.library()
        assert type(info.value) is bad.exc, f"{type(info.value).__name__}: {info.value}"
        if name != "disk_full":  # the probe write names its own file
            message = info.value.args[0] if isinstance(info.value, KeyError) else str(info.value)
            assert (bad.library_fragment or bad.fragment) in message
            assert "\n" not in message
    before = snapshot(watch)
    result = runner.invoke(app, bad.argv)
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, BaseException) or isinstance(
        result.exception, SystemExit
    ), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert bad.fragment in errors[0], result.output
    assert "Traceback" not in result.output
    if bad.kept:  # everything there before is unchanged, and the new run folder is kept
        after = snapshot(watch) or {}
        assert {k: v for k, v in after.items() if k in (before or {})} == (before or {})
        assert any(k.endswith("config.yaml") for k in after), sorted(after)
        assert "the run folder is kept" in errors[0]
    else:
        assert snapshot(watch) == before, f"{watch} changed"
    leftovers = [*tmp_path.rglob("*.tmp"), *tmp_path.rglob("*.partial")]
    assert not leftovers, leftovers


def test_the_table_is_large_enough():
    assert len(CASES) >= 25


# --------------------------------------------------------------------------- details
@needs_proc
def test_disk_full_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "history.jsonl"
    write_text_atomic(target, "epoch 1\n")
    other = tmp_path / "config.yaml"
    write_text_atomic(other, "seed: 0\n")
    disk = DiskBudget(monkeypatch, tmp_path, budget=100)
    with pytest.raises(OSError) as info:
        write_bytes_atomic(target, b"epoch 2\n" * 1000)
    assert info.value.errno == errno.ENOSPC and disk.hits == 1
    assert str(info.value).endswith(f"cannot write '{target}': No space left on device")
    assert target.read_text() == "epoch 1\n" and other.read_text() == "seed: 0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "history.jsonl"]


@needs_proc
def test_disk_full_during_training_keeps_the_run_folder_without_partial_files(
    tmp_path, monkeypatch
):
    out = tmp_path / "new" / "runs"  # does not exist yet: the CLI makes it
    DiskBudget(monkeypatch, tmp_path, budget=2000)
    result = runner.invoke(app, ["train", "-q", "--out", str(out), *SMALL])
    assert result.exit_code == 2, result.output
    assert "No space left on device" in result.output and "the run folder is kept" in result.output
    assert (out / "synthetic-joint-s0" / "config.yaml").is_file()  # training had begun
    assert not [*tmp_path.rglob("*.tmp"), *tmp_path.rglob("*.partial")]


def test_labels_outside_the_classes_are_refused_for_every_dataset():
    from equimodal.data.base import DatasetInfo, FeatureSplit, ModalitySpec, MultimodalData

    def split(labels):
        n = len(labels)
        return FeatureSplit(
            {"a": torch.zeros(n, 2)}, torch.tensor(labels), torch.arange(10, 10 + n)
        )

    info = DatasetInfo("mine", (ModalitySpec("a", (2,)),), 3, 9, "tests", "n/a")
    MultimodalData(info, split([0, 1, 2]), split([0, 1]), split([2]))
    with pytest.raises(ValueError, match="mine test: sample 11 has label 3, outside the 3"):
        MultimodalData(info, split([0, 1, 2]), split([0, 1]), split([2, 3]))
    with pytest.raises(ValueError, match="mine train: sample 10 has label -1"):
        MultimodalData(info, split([-1, 1, 2]), split([0, 1]), split([2]))


def test_error_messages_keep_square_brackets(tmp_path):
    root = tmp_path / "data[bold]"
    result = runner.invoke(
        app, ["train", "--dataset", "features", "--set", f"dataset.options.root={root}"]
    )
    assert result.exit_code == 2
    assert f"dataset folder '{root}' does not exist" in result.output


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (lambda h: [1, 2], "has corrupt metadata (not a mapping)"),
        (lambda h: {**h, "optimizer": {"state": 3}}, "has a corrupt optimizer state"),
        (lambda h: {**h, "format": "other-tool"}, "is not an equimodal checkpoint"),
    ],
)
def test_checkpoint_headers_of_the_wrong_shape_are_checkpoint_errors(
    trained_run, tmp_path, header, fragment
):
    ckpt = tmp_path / "last.safetensors"
    shutil.copy(trained_run / "checkpoints" / "last.safetensors", ckpt)
    resave(ckpt, header)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(ckpt)
    assert f"checkpoint '{ckpt}' {fragment}" == str(info.value)
