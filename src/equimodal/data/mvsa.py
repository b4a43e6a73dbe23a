"""MVSA-Single: tweets with an image and a text, 3 sentiment classes.

Source: T. Niu, S. Zhu, L. Pang, A. El Saddik, "Sentiment Analysis on Multi-View Social
Data", MultiMedia Modeling (MMM) 2016; 4869 image-text posts from Twitter, each labelled
by one annotator for the text and for the image (positive, neutral, negative). The data
is distributed for research by the authors (MCRLab, University of Ottawa) and mirrored on
Kaggle; the tweets remain under Twitter's terms. equimodal ships no part of it.

Raw layout (``equimodal prepare mvsa_single --raw RAW --out ROOT``)::

    RAW/data/<id>.jpg, RAW/data/<id>.txt     one post: the image and the tweet text
    RAW/labelResultAll.txt                   "ID<TAB>text,image", one line per post
    RAW/my_train.txt, my_test.txt, ...        optional community split files (see below)

**Label rule** (Xu and Mao, MultiSentiNet, CIKM 2017; used by MLA and later work): a post
whose text and image labels agree keeps that label; when one of them is neutral it takes
the other (non-neutral) one; a post with one positive and one negative label is dropped
(4511 of the 4869 posts remain). Class ids follow MLA's sorted class list: 0 negative,
1 neutral, 2 positive. A line with several ``text,image`` pairs (MVSA-Multiple's three
annotators) first takes the majority label per modality (a modality without a majority
drops the post).

**Splits.** Community split files in the raw folder are used when present: MLA's
``my_train.txt`` / ``my_test.txt`` and the ``my_{train,val,test}_mvsa.txt`` of later
work (rows ``<id>.jpg <label>``), or ``train.txt`` / ``val.txt`` / ``test.txt`` (rows
``<id>`` or ``<id> <label>``); a label in a split file wins over the rule (the number
of disagreements is reported). Without split files, ``prepare`` writes a seeded stratified
80/10/10 split (``split_seed``, ``val_fraction``, ``test_fraction``).

**Text encoding.** MVSA's text files are not all valid UTF-8: each is decoded as UTF-8,
else Windows-1252, else Latin-1 (:func:`equimodal.data.text.decode_bytes`), stored
re-encoded as UTF-8, and the number of fallbacks is reported.
"""

from __future__ import annotations

import csv
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from equimodal.data.base import TEXT_KIND, DatasetInfo, ModalitySpec, MultimodalData
from equimodal.data.frames import load_frames
from equimodal.data.items import ItemSplit
from equimodal.data.loaders import (
    check_loader_options,
    hold_out_validation,
    item_rng,
    missing_files_error,
    prepared_root,
    reader_split,
)
from equimodal.data.prepare import (
    PrepareSummary,
    atomic_output,
    check_options,
    failure_notes,
    prepare_hint,
    read_prepare_json,
    register_preparer,
    run_items,
    write_prepare_json,
    write_text_file,
)
from equimodal.data.registry import register_dataset
from equimodal.data.text import DEFAULT_MAX_TEXT_BYTES, decode_bytes, encode_text, read_text_file

CLASSES = ("negative", "neutral", "positive")  # MLA's sorted class list: ids 0, 1, 2
SPLITS = ("train", "val", "test")
SPLIT_CANDIDATES = {
    "train": ("train.txt", "my_train.txt", "my_train_mvsa.txt"),
    "val": (
        "val.txt",
        "valid.txt",
        "dev.txt",
        "my_val.txt",
        "my_dev.txt",
        "my_val_mvsa.txt",
        "my_dev_mvsa.txt",
    ),
    "test": ("test.txt", "my_test.txt", "my_test_mvsa.txt"),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
INFO = DatasetInfo(
    name="mvsa_single",
    modalities=(
        ModalitySpec("image", (1, 3, 224, 224), "frames"),
        ModalitySpec("text", (DEFAULT_MAX_TEXT_BYTES,), TEXT_KIND),
    ),
    num_classes=3,
    num_samples=4511,
    source=(
        "MVSA-Single (Niu et al., MMM 2016), MCRLab / Kaggle mirror; label rule of "
        "MultiSentiNet / MLA; needs `equimodal prepare mvsa_single`"
    ),
    license="research use, from the authors; tweets under Twitter's terms",
    description="tweet sentiment: image + text (UTF-8 bytes), 3 classes",
    class_names=CLASSES,
)


# --------------------------------------------------------------------------- labels
def agreed_label(text_label: str, image_label: str) -> str | None:
    """The post label from its text and image labels; None when they conflict.

    Equal labels are kept; neutral + X gives X; positive + negative is dropped.
    """
    for label in (text_label, image_label):
        if label not in CLASSES:
            raise ValueError(f"unknown MVSA label {label!r}; expected one of {', '.join(CLASSES)}")
    if text_label == image_label:
        return text_label
    if text_label == "neutral":
        return image_label
    if image_label == "neutral":
        return text_label
    return None


def _majority(labels: list[str]) -> str | None:
    label, count = Counter(labels).most_common(1)[0]
    return label if count * 2 > len(labels) else None


def read_label_file(path: Path) -> dict[str, tuple[str | None, str | None]]:
    """``{id: (text label, image label)}`` of ``labelResultAll.txt``.

    Rows are ``ID<TAB>text,image`` (a header line is skipped); with several pairs per row
    (MVSA-Multiple) each modality takes its majority label, None without a majority.
    """
    if not path.is_file():
        raise FileNotFoundError(f"MVSA label file {str(path)!r} does not exist")
    lines, _ = read_text_file_lines(path)
    out: dict[str, tuple[str | None, str | None]] = {}
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        if number == 1 and not parts[0].isdigit():
            continue  # header "ID text,image"
        pairs = [p.lower().split(",") for p in parts[1:]]
        if not pairs or any(len(p) != 2 or not all(x in CLASSES for x in p) for p in pairs):
            raise ValueError(
                f"{str(path)!r} line {number}: expected 'ID text,image' with labels in "
                f"{', '.join(CLASSES)}, got {line.strip()!r}"
            )
        out[parts[0]] = (_majority([p[0] for p in pairs]), _majority([p[1] for p in pairs]))
    return out


def read_text_file_lines(path: Path) -> tuple[list[str], str]:
    """Lines of a small text file (decoded like the posts) and the encoding used."""
    data, encoding = decode_bytes(path.read_bytes())
    return data.splitlines(), encoding


def _post_id(token: str) -> str:
    name = token.strip().strip('"')
    for suffix in (*IMAGE_SUFFIXES, ".txt"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_split_file(path: Path) -> list[tuple[str, str | None]]:
    """``[(id, label or None)]`` of a split file: rows ``<id>[.jpg]`` or ``<id>[.jpg] <label>``.

    The separator may be spaces, a tab or a comma; a header line is skipped.
    """
    rows: list[tuple[str, str | None]] = []
    lines, _ = read_text_file_lines(path)
    for number, line in enumerate(lines, start=1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        post = _post_id(parts[0])
        if number == 1 and not post.isdigit() and post.lower() in ("id", "guid", "name"):
            continue
        label = parts[-1].lower() if len(parts) > 1 else None
        if label is not None and label not in CLASSES:
            raise ValueError(
                f"{str(path)!r} line {number}: label {parts[-1]!r} is not one of "
                f"{', '.join(CLASSES)}"
            )
        rows.append((post, label))
    return rows


def stratified_split(
    ids: list[str], labels: list[int], fractions: tuple[float, float], seed: int
) -> dict[str, list[str]]:
    """Seeded train / val / test lists: ``fractions`` = (val, test), stratified when possible.

    Classes too small to stratify fall back to a seeded random split. Each list keeps the
    order of ``ids``.
    """
    from sklearn.model_selection import train_test_split

    val_fraction, test_fraction = fractions
    index = np.arange(len(ids))
    y = np.asarray(labels)

    def cut(rows: np.ndarray, size: float, salt: int) -> tuple[np.ndarray, np.ndarray]:
        n_held = max(1, int(round(size * len(rows))))
        try:
            kept, held = train_test_split(
                rows, test_size=n_held, stratify=y[rows], random_state=seed + salt
            )
        except ValueError:  # a class with a single post
            order = np.random.default_rng(seed + salt).permutation(rows)
            kept, held = order[n_held:], order[:n_held]
        return np.sort(kept), np.sort(held)

    rest, test = cut(index, test_fraction, 0)
    train, val = cut(rest, val_fraction / (1.0 - test_fraction), 1)
    return {
        "train": [ids[i] for i in train],
        "val": [ids[i] for i in val],
        "test": [ids[i] for i in test],
    }


# --------------------------------------------------------------------------- loader
class ImageTextReader:
    """Reads one MVSA item ``{"row", "image", "text"}``: the image as frames, the text bytes.

    Training images get a random resized crop and horizontal flip drawn from a generator
    seeded by (seed, pass over the split, row), as the audio-visual readers, so runs
    reproduce whatever the number of loader workers.
    """

    def __init__(self, frame_size: int, train: bool, augment: bool, seed: int) -> None:
        self.frame_size = frame_size
        self.train = train
        self.augment = augment
        self.seed = seed
        self.split: Any = None  # the ItemSplit, for its pass counter

    def __call__(self, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        rng = item_rng(self.seed, self.split, item) if self.train and self.augment else None
        image = load_frames(
            [item["image"]], self.frame_size, augment=self.train and self.augment, rng=rng
        )
        return {"image": image, "text": torch.from_numpy(item["text"].copy())}


@register_dataset(INFO)
def load_mvsa_single(
    *,
    seed: int = 0,
    root: str | None = None,
    frame_size: int = 224,
    augment: bool = True,
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
    val_fraction: float = 0.1,
    num_workers: int | str = "auto",
    max_items: int | None = None,
) -> MultimodalData:
    """MVSA-Single from a folder written by ``equimodal prepare mvsa_single``.

    ``image`` is ``(1, 3, frame_size, frame_size)`` (ImageNet-normalised; training images
    augmented when ``augment``), ``text`` the tweet as ``max_text_bytes`` UTF-8 bytes.
    The validation split is the prepared ``val.txt``, or a stratified ``val_fraction`` of
    train for ``seed`` when the community split has none; ``max_items`` keeps the first
    items of each split file (quick runs).
    """
    base = prepared_root(root, "mvsa_single")
    if frame_size < 8:
        raise ValueError(f"frame_size must be >= 8, got {frame_size}")
    check_loader_options(num_workers, max_items, max_text_bytes)
    read_prepare_json(base, "mvsa_single")
    rows: dict[str, list[tuple[str, str | None]]] = {}
    for split in SPLITS:
        path = base / f"{split}.txt"
        if path.is_file():
            rows[split] = read_split_file(path)[:max_items]
        elif split != "val":
            raise FileNotFoundError(
                f"{str(path)!r} does not exist; {prepare_hint('mvsa_single', root)}"
            )
    items: list[dict[str, Any]] = []
    labels: list[int] = []
    missing: list[str] = []
    split_of: list[str] = []
    for split, pairs in rows.items():
        for post, label in pairs:
            image, text = base / "image" / f"{post}.jpg", base / "text" / f"{post}.txt"
            for path in (image, text):
                if not path.is_file():
                    missing.append(str(path))
            if label is None:
                raise ValueError(f"{str(base / f'{split}.txt')!r}: post {post} has no label")
            items.append({"row": len(items), "id": post, "image": str(image), "text": text})
            labels.append(CLASSES.index(label))
            split_of.append(split)
    if missing:
        raise missing_files_error("mvsa_single", base, missing)
    for item in items:
        item["text"] = encode_text(read_text_file(item["text"])[0], max_text_bytes)
    y = np.asarray(labels, dtype=np.int64)
    where = np.asarray(split_of)
    train_rows = np.flatnonzero(where == "train")
    test_rows = np.flatnonzero(where == "test")
    if len(train_rows) < 2 or len(test_rows) == 0:
        raise ValueError(
            f"dataset 'mvsa_single' at {str(base)!r} has {len(train_rows)} train and "
            f"{len(test_rows)} test posts; need at least 2 and 1"
        )
    if "val" in rows and rows["val"]:
        val_rows = np.flatnonzero(where == "val")
    else:
        train_rows, val_rows = hold_out_validation(
            "mvsa_single", train_rows, y, val_fraction, seed, max_items is not None
        )
    image_shape = (1, 3, frame_size, frame_size)
    shapes = {"image": image_shape, "text": (max_text_bytes,)}

    def make(ids: np.ndarray, train: bool) -> ItemSplit:
        reader = ImageTextReader(frame_size, train, augment, seed)
        return reader_split(
            items, ids, reader, y, shapes, num_workers, dtypes={"text": torch.uint8}
        )

    from dataclasses import replace

    info = replace(
        INFO,
        modalities=(
            ModalitySpec("image", image_shape, "frames"),
            ModalitySpec("text", (max_text_bytes,), TEXT_KIND),
        ),
        num_samples=len(items),
    )
    return MultimodalData(
        info=info,
        train=make(train_rows, True),
        val=make(val_rows, False),
        test=make(test_rows, False),
        options={
            "root": str(root),
            "frame_size": frame_size,
            "augment": augment,
            "max_text_bytes": max_text_bytes,
            "val_fraction": val_fraction,
            "max_items": max_items,
        },
    )


# --------------------------------------------------------------------------- prepare
class MvsaPrepareOptions(BaseModel):
    """Options of ``equimodal prepare mvsa_single`` (``-o key=value``)."""

    model_config = ConfigDict(extra="forbid")

    data_dir: str = "data"
    labels_file: str = "labelResultAll.txt"
    #: community split files in the raw folder (default: the first found of the usual names)
    train_split: str | None = None
    val_split: str | None = None
    test_split: str | None = None
    #: seeded stratified split written when the raw folder has no split files
    split_seed: int = 0
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    #: images are centre-cropped to a square and resized to image_size pixels (null: kept)
    image_size: int | None = Field(256, ge=8)
    workers: int = Field(1, gt=0)
    strict: bool = False
    overwrite: bool = False


def _find_split(raw: Path, given: str | None, split: str) -> Path | None:
    if given is not None:
        path = raw / given
        if not path.is_file():
            raise FileNotFoundError(f"MVSA {split} split file {str(path)!r} does not exist")
        return path
    return next((raw / name for name in SPLIT_CANDIDATES[split] if (raw / name).is_file()), None)


def _square_image(source: Path, dest: Path, size: int | None) -> None:
    """Write ``source`` as an RGB jpg at ``dest``: centre square resized to ``size``."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("preparing images needs pillow: pip install 'equimodal[media]'") from None
    try:
        with Image.open(source) as img:
            img = img.convert("RGB")
    except Exception as err:  # pillow raises several error types for bad files
        raise ValueError(f"cannot read image {str(source)!r}: {err}") from None
    if size is not None:
        width, height = img.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
    with atomic_output(dest) as tmp:
        img.save(tmp, format="JPEG", quality=95)


def _remove_partials(out: Path) -> None:
    for folder in (out, out / "image", out / "text"):
        if folder.is_dir():
            for leftover in folder.glob(".*.partial"):
                leftover.unlink()


@register_preparer("mvsa_single")
def prepare_mvsa_single(
    raw: Path, out: Path, progress: bool = True, **options: Any
) -> PrepareSummary:
    """Raw MVSA-Single (jpg + txt per post, label file) -> squared jpgs, UTF-8 texts, splits."""
    opts = check_options(MvsaPrepareOptions, options, "prepare mvsa_single")
    data_dir = raw / opts.data_dir
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"MVSA data folder {str(data_dir)!r} does not exist (expected RAW/data/<id>.jpg "
            "and <id>.txt; -o data_dir=NAME for another folder)"
        )
    notes: list[str] = []
    label_path = raw / opts.labels_file
    pairs = read_label_file(label_path) if label_path.is_file() else {}
    ruled = {
        post: agreed_label(t, i) if t is not None and i is not None else None
        for post, (t, i) in pairs.items()
    }
    split_files = {s: _find_split(raw, getattr(opts, f"{s}_split"), s) for s in SPLITS}
    labels: dict[str, str] = {}
    order: dict[str, list[str]] = {}
    if split_files["train"] is not None or split_files["test"] is not None:
        if split_files["train"] is None or split_files["test"] is None:
            have = "train" if split_files["train"] is not None else "test"
            raise FileNotFoundError(
                f"{str(split_files[have])!r} has no matching "
                f"{'test' if have == 'train' else 'train'} split file in {str(raw)!r}"
            )
        disagree = dropped = 0
        for split, path in split_files.items():
            if path is None:
                continue
            order[split] = []
            for post, label in read_split_file(path):
                if label is None:
                    label = ruled.get(post)
                    if label is None:
                        dropped += 1
                        continue
                elif ruled.get(post) not in (None, label):
                    disagree += 1
                labels[post] = label
                order[split].append(post)
        seen: dict[str, str] = {}
        for split, posts in order.items():
            for post in posts:
                if seen.setdefault(post, split) != split:
                    raise ValueError(
                        f"MVSA post {post} is in both the {seen[post]} and the {split} split "
                        f"files in {str(raw)!r}"
                    )
        used = ", ".join(p.name for p in split_files.values() if p is not None)
        notes.append(f"splits from {used}")
        if disagree:
            notes.append(
                f"{disagree} split-file labels differ from the text/image rule on "
                f"{opts.labels_file}; the split files' labels are used"
            )
        if dropped:
            notes.append(
                f"{dropped} posts of the split files have no usable label and are left out"
            )
    else:
        if not pairs:
            raise FileNotFoundError(
                f"MVSA label file {str(label_path)!r} does not exist and the raw folder has no "
                "split files with labels"
            )
        kept = sorted((p for p, lab in ruled.items() if lab is not None), key=_sort_key)
        labels = {p: ruled[p] for p in kept}  # type: ignore[misc]
        order = stratified_split(
            kept,
            [CLASSES.index(labels[p]) for p in kept],
            (opts.val_fraction, opts.test_fraction),
            opts.split_seed,
        )
        notes.append(
            f"no split files: seeded stratified split (split_seed={opts.split_seed}) of the "
            f"{len(kept)} posts the label rule keeps: "
            + ", ".join(f"{len(order[s])} {s}" for s in SPLITS)
        )
    if pairs:
        conflicts = sum(1 for lab in ruled.values() if lab is None)
        notes.append(
            f"label rule on {opts.labels_file}: {len(pairs) - conflicts} of {len(pairs)} posts "
            f"kept, {conflicts} dropped (positive vs negative, or no majority)"
        )
    settings = {"image_size": opts.image_size, "classes": list(CLASSES)}
    write_prepare_json(out, "mvsa_single", settings, opts.overwrite)
    _remove_partials(out)
    fallbacks: list[tuple[str, str]] = []
    lock = threading.Lock()

    def work(post: str) -> bool:
        image_out, text_out = out / "image" / f"{post}.jpg", out / "text" / f"{post}.txt"
        wrote = False
        if opts.overwrite or not image_out.is_file():
            source = next(
                (
                    data_dir / f"{post}{s}"
                    for s in IMAGE_SUFFIXES
                    if (data_dir / f"{post}{s}").is_file()
                ),
                None,
            )
            if source is None:
                raise FileNotFoundError(f"no image: {str(data_dir / post)}.jpg does not exist")
            _square_image(source, image_out, opts.image_size)
            wrote = True
        if opts.overwrite or not text_out.is_file():
            text, encoding = read_text_file(data_dir / f"{post}.txt")
            if encoding != "utf-8":
                with lock:
                    fallbacks.append((post, encoding))
            with atomic_output(text_out) as tmp:
                tmp.write_text(text + "\n", encoding="utf-8")
            wrote = True
        return wrote

    posts = list(dict.fromkeys(p for s in SPLITS for p in order.get(s, [])))
    written, skipped, failures = run_items(
        "mvsa_single", posts, work, progress, workers=opts.workers, strict=opts.strict
    )
    for split in SPLITS:
        path = out / f"{split}.txt"
        if split in order:
            write_text_file(path, [f"{p} {labels[p]}" for p in order[split] if p not in failures])
        elif path.exists():
            path.unlink()
    if pairs:
        _write_label_table(out / "labels.csv", pairs, ruled)
    if fallbacks:
        kinds = Counter(encoding for _, encoding in fallbacks)
        first = sorted(fallbacks, key=lambda f: _sort_key(f[0]))[0]
        notes.append(
            f"{len(fallbacks)} text files were not valid UTF-8 and were decoded as "
            + ", ".join(f"{k} ({v})" for k, v in sorted(kinds.items()))
            + f" (first: {first[0]}.txt); stored as UTF-8"
        )
    notes += failure_notes(out, failures, len(posts))
    return PrepareSummary("mvsa_single", written=written, skipped=skipped, notes=notes)


def _sort_key(post: str) -> tuple[int, str]:
    return (int(post), "") if post.isdigit() else (1 << 62, post)


def _write_label_table(
    path: Path, pairs: dict[str, tuple[str | None, str | None]], ruled: dict[str, str | None]
) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text_label", "image_label", "label"])
        for post in sorted(pairs, key=_sort_key):
            text_label, image_label = pairs[post]
            writer.writerow([post, text_label or "", image_label or "", ruled[post] or ""])
