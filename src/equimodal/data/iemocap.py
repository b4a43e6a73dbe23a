"""IEMOCAP: dyadic acted conversations, utterance-level audio, visual and text, 4 or 6 emotions.

Source: C. Busso, M. Bulut, C.-C. Lee, A. Kazemzadeh, E. Mower, S. Kim, J. N. Chang,
S. Lee, S. S. Narayanan, "IEMOCAP: Interactive emotional dyadic motion capture database",
Language Resources and Evaluation 42(4), 2008. About 12 h of audio-visual recordings of 10
actors in 5 sessions; released by USC SAIL (sail.usc.edu/iemocap) after signing its
licence (research use; no redistribution). equimodal ships no part of it.

The balance and emotion literature trains on utterance-level features that it distributes
as Python pickles. ``equimodal prepare iemocap --raw RAW --out ROOT`` converts one of these
sources (``-o source=...``, found automatically by default) into plain ``.npy`` arrays and a
CSV table, so the loader never unpickles anything:

- ``dialoguernn``: ``RAW/IEMOCAP_features.pkl`` of bc-LSTM / DialogueRNN / DialogueGCN
  (Poria et al. 2017; Majumder et al. 2019): per-dialogue dicts of utterance ids, labels
  (6 classes: hap sad neu ang exc fru), text (100-d), audio (100-d) and visual (512-d)
  vectors and the transcripts, with the session 1-4 / session 5 train / test split. The
  12-item variant with RoBERTa text features is read as well (its first text features).
- ``mult``: ``RAW/iemocap_data.pkl`` (word-aligned) or ``iemocap_data_noalign.pkl`` of
  MulT (Tsai et al., ACL 2019), the format BalanceBenchmark reads: ``train`` / ``valid`` /
  ``test`` dicts of ``text`` (GloVe, 300-d), ``audio`` (COVAREP, 74-d) and ``vision``
  (Facet, 35-d) sequences with one-vs-rest ``labels`` for neutral, happy, sad, angry
  (4 classes only; no transcripts).
- ``files`` (no pickle): transcripts and labels from the IEMOCAP release
  (``RAW/Session*/dialog/transcriptions/*.txt`` and ``.../EmoEvaluation/*.txt``; sessions
  1-4 train, 5 test) or from MLA's split files (``my_train_iemo.txt``, ``my_dev_iemo.txt``,
  ``my_test_iemo.txt``, rows ``<name>.mp4 [split|sign] <transcript> [split|sign] <label>``),
  and per-utterance feature arrays ``<id>.npy`` (``(T, d)`` or ``(d,)``) in
  ``RAW/features/{audio,visual,text}/`` (other folders with ``-o audio_dir=...``, e.g.
  MLA's audio fbanks). An utterance without a feature file has that modality absent.

**Pickles.** A pickle can run code when it is loaded. Sources in pickle form are read by
:class:`RestrictedUnpickler`, which only builds numpy arrays, numpy scalars and dtypes,
and Python containers, strings and numbers; any other object in the file stops ``prepare``
with an error naming it. Only ``prepare`` reads pickles, never the loader.

**Classes.** 4 (default): neutral, happy (happy and excited merged), sad, angry, in MulT's
order (``neu hap sad ang``); 6 (``dataset.options.classes=6``): ``hap sad neu ang exc fru``
in DialogueRNN's order. Utterances of other emotions (frustrated in the 4-class protocol,
surprise, fear, disgust, other, no agreement ``xxx``) are left out.

**Modalities.** ``audio``, ``visual`` and ``text`` are sequences (``ModalitySpec`` kind
``"sequence"``, shape ``(T, d + 1)``: features then a 0/1 column marking real steps, see
:mod:`equimodal.models.sequence`), a single step for the per-utterance vectors of
``dialoguernn``. With ``dataset.options.text=transcript`` the ``text`` modality is the
transcript as UTF-8 bytes (kind ``"text"``) for ``text_bow`` or ``hf_text``.
"""

from __future__ import annotations

import csv
import pickle
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from equimodal.data.base import (
    SEQUENCE_KIND,
    TEXT_KIND,
    DatasetInfo,
    ModalitySpec,
    MultimodalData,
)
from equimodal.data.items import ItemSplit
from equimodal.data.loaders import (
    check_loader_options,
    hold_out_validation,
    missing_files_error,
    prepared_root,
)
from equimodal.data.prepare import (
    PrepareSummary,
    atomic_output,
    check_options,
    npy_shape,
    read_prepare_json,
    register_preparer,
    write_prepare_json,
)
from equimodal.data.registry import register_dataset
from equimodal.data.text import DEFAULT_MAX_TEXT_BYTES, clean_text, decode_bytes, encode_text

CLASSES_4 = ("neu", "hap", "sad", "ang")  # MulT's order; hap = happy + excited
CLASSES_6 = ("hap", "sad", "neu", "ang", "exc", "fru")  # DialogueRNN's label ids 0..5
CLASS_NAMES = {"neu": "neutral", "hap": "happy", "sad": "sad", "ang": "angry"}
MODALITIES = ("audio", "visual", "text")
TABLE = "utterances.csv"
EMOTION_WORDS = {
    "neu": "neu", "neutral": "neu",
    "hap": "hap", "happy": "hap", "happiness": "hap", "joy": "hap",
    "exc": "exc", "excited": "exc", "excitement": "exc",
    "ang": "ang", "angry": "ang", "anger": "ang",
    "sad": "sad", "sadness": "sad",
    "fru": "fru", "frustrated": "fru", "frustration": "fru",
    "sur": "sur", "surprise": "sur", "surprised": "sur",
    "fea": "fea", "fear": "fea", "fearful": "fea",
    "dis": "dis", "disgust": "dis", "disgusted": "dis",
    "oth": "oth", "other": "oth", "xxx": "xxx",
}  # fmt: skip
INFO = DatasetInfo(
    name="iemocap",
    modalities=(
        ModalitySpec("audio", (1, 101), SEQUENCE_KIND),
        ModalitySpec("visual", (1, 513), SEQUENCE_KIND),
        ModalitySpec("text", (1, 101), SEQUENCE_KIND),
    ),
    num_classes=4,
    num_samples=5531,
    source=(
        "IEMOCAP (Busso et al., LRE 2008); DialogueRNN or MulT features, or .npy + "
        "transcripts; needs `equimodal prepare iemocap`"
    ),
    license="USC IEMOCAP licence: research use, no redistribution",
    description="acted emotions: audio, visual, text sequences or transcript bytes; 4 or 6 classes",
    class_names=tuple(CLASS_NAMES[c] for c in CLASSES_4),
)


def emotion_code(label: str) -> str:
    """The 3-letter IEMOCAP code of an emotion label (``Happy`` -> ``hap``)."""
    code = EMOTION_WORDS.get(label.strip().lower())
    if code is None:
        raise ValueError(f"unknown IEMOCAP emotion {label!r}")
    return code


def class_index(code: str, classes: int) -> int | None:
    """Class id of an emotion code under the 4- or 6-class protocol (None: left out)."""
    if classes == 4:
        code = "hap" if code == "exc" else code
        return CLASSES_4.index(code) if code in CLASSES_4 else None
    return CLASSES_6.index(code) if code in CLASSES_6 else None


# --------------------------------------------------------------------------- pickles
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "bytearray"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
    ("__builtin__", "list"),
    ("_codecs", "encode"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only builds numpy arrays and plain Python data.

    Allowed globals: numpy's array reconstruction, ``ndarray``, ``dtype`` and scalars,
    ``set`` / ``frozenset`` / ``list`` / ``dict`` / ``bytearray``, ``OrderedDict`` /
    ``defaultdict`` and ``_codecs.encode`` (bytes in Python 2 pickles). Anything else
    (a class, a function such as ``os.system``) raises ``UnpicklingError``, so a
    malicious file cannot run code. ``numpy.core`` names are read as ``numpy._core``
    under NumPy 2.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Resolve an allowed global; refuse every other one."""
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


def load_pickle(path: Path) -> Any:
    """The content of a feature pickle, read with :class:`RestrictedUnpickler`."""
    try:
        with open(path, "rb") as fh:
            return RestrictedUnpickler(fh, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{str(path)!r}: {err}; only numpy arrays and plain Python data are read from a "
            "pickle (convert the features to .npy files and use -o source=files)"
        ) from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"cannot read pickle {str(path)!r}: {err or type(err).__name__}") from None


# --------------------------------------------------------------------------- sources
class Utterances:
    """Parsed source: per-utterance ids, emotion codes, splits, transcripts and features.

    ``features[m]`` is ``(N, T, d)`` float32 and ``masks[m]`` ``(N, T)`` bool (all-False
    rows: the modality is absent for that utterance).
    """

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.emotions: list[str] = []
        self.splits: list[str] = []
        self.texts: list[str] = []
        self.features: dict[str, np.ndarray] = {}
        self.masks: dict[str, np.ndarray] = {}
        self.dropped = 0  # utterances of the source left out (no single emotion)


def _as_str(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return decode_bytes(bytes(value))[0]
    if isinstance(value, np.ndarray):
        return "_".join(_as_str(v) for v in value.ravel())
    return str(value)


def _vector_rows(values: Any, where: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise ValueError(f"{where}: expected one feature vector per utterance, got {array.shape}")
    return array


def _clean(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    return np.where(np.isfinite(array), array, np.float32(0.0))  # MulT's audio holds -inf


def read_dialoguernn(path: Path, content: Any = None) -> Utterances:
    """Utterances of a DialogueRNN-style ``IEMOCAP_features.pkl`` (9- or 12-item tuple).

    ``content`` is the already unpickled file (read from ``path`` when None).
    """
    content = load_pickle(path) if content is None else content
    if not isinstance(content, tuple | list) or len(content) not in (9, 12):
        got = f"{type(content).__name__} of {len(content)}" if hasattr(content, "__len__") else ""
        raise ValueError(
            f"{str(path)!r} is not a DialogueRNN IEMOCAP feature file (a 9- or 12-item tuple: "
            f"ids, speakers, labels, text, [roberta x3,] audio, visual, sentences, train, test); "
            f"got {got or type(content).__name__}"
        )
    if len(content) == 9:
        ids, _, labels, text, audio, visual, sentences, train, test = content
    else:
        ids, _, labels, text, _, _, _, audio, visual, sentences, train, test = content
    out = Utterances()
    rows: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
    sources = {"audio": audio, "visual": visual, "text": text}
    for split, dialogues in (("train", train), ("test", test)):
        keys = sorted(dialogues) if isinstance(dialogues, set | frozenset) else list(dialogues)
        for dialogue in keys:
            where = f"{str(path)!r} dialogue {dialogue!r}"
            try:
                names = list(ids[dialogue])
                codes = [CLASSES_6[int(k)] for k in labels[dialogue]]
                said = [clean_text(_as_str(s)) for s in sentences[dialogue]]
                vectors = {m: _vector_rows(s[dialogue], where) for m, s in sources.items()}
            except (KeyError, IndexError, TypeError, ValueError) as err:
                raise ValueError(f"{where}: incomplete or malformed entry ({err})") from None
            counts = {len(names), len(codes), len(said), *(len(v) for v in vectors.values())}
            if len(counts) != 1:
                raise ValueError(f"{where}: ids, labels, sentences and features differ in length")
            out.ids += [_as_str(n) for n in names]
            out.emotions += codes
            out.splits += [split] * len(names)
            out.texts += said
            for m in MODALITIES:
                rows[m].append(vectors[m])
    for m in MODALITIES:
        stacked = _clean(np.concatenate(rows[m]))[:, None, :]
        out.features[m] = stacked
        out.masks[m] = np.ones(stacked.shape[:2], dtype=bool)
    return out


MULT_KEYS = {"audio": "audio", "visual": "vision", "text": "text"}


def read_mult(path: Path, content: Any = None) -> Utterances:
    """Utterances of a MulT / BalanceBenchmark ``iemocap_data[_noalign].pkl``.

    ``content`` is the already unpickled file (read from ``path`` when None).
    """
    content = load_pickle(path) if content is None else content
    split_names = {"train": "train", "valid": "val", "val": "val", "dev": "val", "test": "test"}
    if not isinstance(content, dict) or not {"train", "test"} <= set(content):
        raise ValueError(
            f"{str(path)!r} is not a MulT IEMOCAP file (a dict with 'train', 'valid', 'test', "
            "each holding 'text', 'audio', 'vision', 'labels')"
        )
    out = Utterances()
    parts: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
    dropped = 0
    for key, part in content.items():
        if key not in split_names:
            continue
        where = f"{str(path)!r} [{key!r}]"
        if not isinstance(part, dict) or "labels" not in part:
            raise ValueError(f"{where}: expected a dict with 'labels' and the modality arrays")
        labels = np.asarray(part["labels"])
        if labels.ndim == 3:  # (N, 4, 2): one-vs-rest, [:, :, 1] = "is this emotion"
            positive = labels[..., 1] > labels[..., 0]
        elif labels.ndim == 2:  # (N, 4): one-hot
            positive = labels > 0.5
        else:
            positive = np.eye(len(CLASSES_4), dtype=bool)[labels.astype(int).ravel()]
        keep = positive.sum(1) == 1
        dropped += int((~keep).sum())
        ident = part.get("id")
        for i in np.flatnonzero(keep):
            name = _as_str(ident[i]) if ident is not None else f"{split_names[key]}_{i:05d}"
            out.ids.append(name)
            out.emotions.append(CLASSES_4[int(np.argmax(positive[i]))])
            out.splits.append(split_names[key])
            out.texts.append("")
        for m, field in MULT_KEYS.items():
            if field not in part:
                raise ValueError(f"{where}: no {field!r} array")
            array = np.asarray(part[field])
            if array.ndim != 3 or len(array) != len(labels):
                raise ValueError(
                    f"{where}[{field!r}]: expected (N, T, d) with N = {len(labels)}, got "
                    f"{array.shape}"
                )
            parts[m].append(_clean(array[keep]))
    for m in MODALITIES:
        widths = {p.shape[1:] for p in parts[m]}
        if len(widths) != 1:
            raise ValueError(f"{str(path)!r}: {m} arrays differ in shape across splits: {widths}")
        stacked = np.concatenate(parts[m])
        out.features[m] = stacked
        out.masks[m] = (stacked != 0).any(-1)  # MulT pads with zero rows
    out.dropped = dropped
    return out


_EVAL_LINE = re.compile(r"^\[\s*[\d.]+\s*-\s*[\d.]+\s*\]\s+(\S+)\s+(\S+)\s+\[")
_TRANSCRIPT_LINE = re.compile(r"^(Ses\S+)\s+\[[^\]]*\]:\s?(.*)$")
MLA_SEPARATOR = " [split|sign] "
MLA_SPLITS = {
    "train": ("my_train_iemo.txt",),
    "val": ("my_dev_iemo.txt", "my_val_iemo.txt", "my_valid_iemo.txt"),
    "test": ("my_test_iemo.txt",),
}


def _utterance_name(token: str) -> str:
    name = Path(token.strip()).name
    for suffix in (".mp4", ".avi", ".wav", ".npy"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_release(raw: Path, test_sessions: list[int]) -> list[tuple[str, str, str, str]]:
    """``[(id, emotion, split, transcript)]`` from the IEMOCAP release's dialog folders."""
    sessions = sorted(p for p in raw.glob("Session*") if p.is_dir())
    emotions: dict[str, str] = {}
    texts: dict[str, str] = {}
    for session in sessions:
        for path in sorted((session / "dialog" / "EmoEvaluation").glob("*.txt")):
            for line in decode_bytes(path.read_bytes())[0].splitlines():
                found = _EVAL_LINE.match(line.strip())
                if found:
                    emotions[found.group(1)] = emotion_code(found.group(2))
        for path in sorted((session / "dialog" / "transcriptions").glob("*.txt")):
            for line in decode_bytes(path.read_bytes())[0].splitlines():
                found = _TRANSCRIPT_LINE.match(line.strip())
                if found:
                    texts[found.group(1)] = clean_text(found.group(2))
    rows = []
    for name in sorted(emotions):
        match = re.match(r"Ses0*(\d+)", name)
        session = int(match.group(1)) if match else 0
        split = "test" if session in test_sessions else "train"
        rows.append((name, emotions[name], split, texts.get(name, "")))
    return rows


def read_mla_splits(paths: dict[str, Path]) -> list[tuple[str, str, str, str]]:
    """``[(id, emotion, split, transcript)]`` from MLA's ``my_*_iemo.txt`` split files."""
    rows = []
    for split, path in paths.items():
        for number, line in enumerate(decode_bytes(path.read_bytes())[0].splitlines(), 1):
            if not line.strip():
                continue
            parts = line.strip().split(MLA_SEPARATOR.strip())
            if len(parts) < 2:
                raise ValueError(
                    f"{str(path)!r} line {number}: expected '<name> [split|sign] <transcript> "
                    "[split|sign] <label>'"
                )
            try:
                code = emotion_code(parts[-1])
            except ValueError as err:
                raise ValueError(f"{str(path)!r} line {number}: {err}") from None
            text = clean_text(" ".join(parts[1:-1])) if len(parts) > 2 else ""
            rows.append((_utterance_name(parts[0]), code, split, text))
    return rows


def read_files(raw: Path, opts: IemocapPrepareOptions) -> Utterances:
    """Utterances from a listing (MLA split files or the release) and per-utterance .npy."""
    mla = {
        split: next((raw / n for n in names if (raw / n).is_file()), None)
        for split, names in MLA_SPLITS.items()
    }
    if mla["train"] is not None and mla["test"] is not None:
        rows = read_mla_splits({s: p for s, p in mla.items() if p is not None})
    elif list(raw.glob("Session*/dialog/EmoEvaluation")):
        rows = read_release(raw, opts.test_sessions)
    else:
        raise FileNotFoundError(
            f"no IEMOCAP source in {str(raw)!r}: expected IEMOCAP_features.pkl (DialogueRNN), "
            "iemocap_data.pkl (MulT), MLA's my_train_iemo.txt + my_test_iemo.txt, or the "
            "release's Session*/dialog/EmoEvaluation folders"
        )
    out = Utterances()
    seen: set[str] = set()
    for name, code, split, text in rows:
        if name in seen:
            raise ValueError(f"IEMOCAP utterance {name!r} is listed twice in {str(raw)!r}")
        seen.add(name)
        out.ids.append(name)
        out.emotions.append(code)
        out.splits.append(split)
        out.texts.append(text)
    for m in MODALITIES:
        folders = [raw / p.strip() for p in getattr(opts, f"{m}_dir").split(",") if p.strip()]
        folders = [f for f in folders if f.is_dir()]
        if not folders:
            continue
        arrays: list[np.ndarray | None] = []
        for name in out.ids:
            path = next((f / f"{name}.npy" for f in folders if (f / f"{name}.npy").is_file()), None)
            if path is None:
                arrays.append(None)
                continue
            try:
                array = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                raise ValueError(f"cannot read features {str(path)!r}: {err}") from None
            arrays.append(_clean(_vector_rows(array, str(path))))
        found = [a for a in arrays if a is not None]
        if not found:
            continue
        widths = {a.shape[1] for a in found}
        if len(widths) != 1:
            raise ValueError(f"{m} feature files in {folders[0]} differ in width: {sorted(widths)}")
        steps = max(a.shape[0] for a in found)
        if opts.max_steps is not None:
            steps = min(steps, opts.max_steps)
        feats = np.zeros((len(arrays), steps, widths.pop()), dtype=np.float32)
        mask = np.zeros((len(arrays), steps), dtype=bool)
        for i, a in enumerate(arrays):
            if a is not None:
                n = min(len(a), steps)
                feats[i, :n], mask[i, :n] = a[:n], True
        out.features[m], out.masks[m] = feats, mask
    return out


# --------------------------------------------------------------------------- prepare
class IemocapPrepareOptions(BaseModel):
    """Options of ``equimodal prepare iemocap`` (``-o key=value``)."""

    model_config = ConfigDict(extra="forbid")

    #: which source to read (auto: the first found of dialoguernn, mult, files)
    source: Literal["auto", "dialoguernn", "mult", "files"] = "auto"
    #: the pickle file in the raw folder (default: the source's usual name)
    pickle_file: str | None = None
    #: files source: folders (comma-separated, under RAW) of per-utterance <id>.npy
    audio_dir: str = "features/audio"
    visual_dir: str = "features/visual"
    text_dir: str = "features/text"
    #: files source with the release's folders: sessions that form the test split
    test_sessions: list[int] = Field(default_factory=lambda: [5])
    #: keep at most this many steps of every sequence (null: all)
    max_steps: int | None = Field(None, gt=0)
    overwrite: bool = False


PICKLE_NAMES = {
    "dialoguernn": (
        "IEMOCAP_features.pkl",
        "IEMOCAP_features_raw.pkl",
        "iemocap_multi_features.pkl",
    ),
    "mult": ("iemocap_data.pkl", "iemocap_data_noalign.pkl"),
}


def _choose_source(raw: Path, opts: IemocapPrepareOptions) -> tuple[str, Path | None]:
    if opts.pickle_file is not None:
        path = raw / opts.pickle_file
        if not path.is_file():
            raise FileNotFoundError(f"IEMOCAP pickle {str(path)!r} does not exist")
        if opts.source in ("dialoguernn", "mult"):
            return opts.source, path
        if opts.source == "files":
            raise ValueError("source=files reads no pickle; drop -o pickle_file")
        # auto: decide by the file's top-level type after loading (done by the caller)
        return "auto", path
    for source in ("dialoguernn", "mult"):
        if opts.source in ("auto", source):
            found = next((raw / n for n in PICKLE_NAMES[source] if (raw / n).is_file()), None)
            if found is not None:
                return source, found
            if opts.source == source:
                raise FileNotFoundError(
                    f"no {source} pickle in {str(raw)!r} (looked for "
                    f"{', '.join(PICKLE_NAMES[source])}; -o pickle_file=NAME for another name)"
                )
    return "files", None


def _save_array(path: Path, array: np.ndarray) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array))


def _write_table(path: Path, data: Utterances) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "emotion", "split", "text"])
        for row in zip(data.ids, data.emotions, data.splits, data.texts, strict=True):
            writer.writerow(row)


@register_preparer("iemocap")
def prepare_iemocap(raw: Path, out: Path, progress: bool = True, **options: Any) -> PrepareSummary:
    """An IEMOCAP feature source (pickle or per-utterance files) -> ``.npy`` arrays + a table.

    The items are the table and one feature array per modality; an item whose file exists
    with the expected shape is skipped.
    """
    opts = check_options(IemocapPrepareOptions, options, "prepare iemocap")
    source, path = _choose_source(raw, opts)
    notes: list[str] = []
    if path is not None:
        content = load_pickle(path)
        if source == "auto":
            source = "mult" if isinstance(content, dict) else "dialoguernn"
        reader = read_mult if source == "mult" else read_dialoguernn
        data = reader(path, content)
        if data.dropped:
            notes.append(f"{data.dropped} utterance(s) without exactly one emotion left out")
    else:
        data = read_files(raw, opts)
    if not data.ids:
        raise ValueError(f"no utterances found in the IEMOCAP source in {str(raw)!r}")
    if opts.max_steps is not None and source != "files":
        for m in list(data.features):
            data.features[m] = data.features[m][:, : opts.max_steps]
            data.masks[m] = data.masks[m][:, : opts.max_steps]
    shapes = {m: list(data.features[m].shape[1:]) for m in MODALITIES if m in data.features}
    settings = {
        "source": source,
        "source_file": path.name if path is not None else None,
        "num_utterances": len(data.ids),
        "modalities": shapes,
        "transcripts": any(data.texts),
        "emotion_classes": [4] if source == "mult" else [4, 6],
        "max_steps": opts.max_steps,
    }
    if not shapes and not settings["transcripts"]:
        raise ValueError(f"the IEMOCAP source in {str(raw)!r} has neither features nor transcripts")
    write_prepare_json(out, "iemocap", settings, opts.overwrite)
    for folder in (out, out / "features"):
        if folder.is_dir():
            for leftover in folder.glob(".*.partial"):
                leftover.unlink()
    written = skipped = 0
    table = out / TABLE
    if opts.overwrite or not _table_matches(table, data.ids):
        _write_table(table, data)
        written += 1
    else:
        skipped += 1
    n = len(data.ids)
    for m, shape in shapes.items():
        feats, mask = out / "features" / f"{m}.npy", out / "features" / f"{m}_mask.npy"
        if (
            not opts.overwrite
            and npy_shape(feats) == (n, *shape)
            and npy_shape(mask) == (n, shape[0])
        ):
            skipped += 1
            continue
        _save_array(feats, data.features[m].astype(np.float32))
        _save_array(mask, data.masks[m].astype(bool))
        written += 1
    counts: dict[str, int] = {}
    for code in data.emotions:
        counts[code] = counts.get(code, 0) + 1
    notes.insert(
        0,
        f"{n} utterances from {source}"
        + (f" ({path.name})" if path is not None else "")
        + "; modalities "
        + (", ".join(f"{m} {'x'.join(map(str, s))}" for m, s in shapes.items()) or "none")
        + ("; transcripts" if settings["transcripts"] else "; no transcripts")
        + "; emotions "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
    )
    return PrepareSummary("iemocap", written=written, skipped=skipped, notes=notes)


def _table_matches(path: Path, ids: list[str]) -> bool:
    if not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return [row["id"] for row in csv.DictReader(fh)] == ids
    except (OSError, KeyError, csv.Error):
        return False


# --------------------------------------------------------------------------- loader
class IemocapReader:
    """Reads one utterance (a row index) from memory-mapped arrays and encoded transcripts."""

    def __init__(
        self,
        features: dict[str, np.ndarray],
        masks: dict[str, np.ndarray],
        steps: dict[str, int],
        text_bytes: np.ndarray | None,
    ) -> None:
        self.features = features
        self.masks = masks
        self.steps = steps
        self.text_bytes = text_bytes

    def __call__(self, row: int) -> dict[str, torch.Tensor]:
        out = {}
        for m, array in self.features.items():
            t = self.steps[m]
            seq = np.empty((t, array.shape[2] + 1), dtype=np.float32)
            seq[:, :-1] = array[row, :t]
            seq[:, -1] = self.masks[m][row, :t]
            seq[seq[:, -1] == 0, :-1] = 0.0
            out[m] = torch.from_numpy(seq)
        if self.text_bytes is not None:
            out["text"] = torch.from_numpy(self.text_bytes[row].copy())
        return out


def _read_table(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {str(path)!r}: {err}") from None
    if rows and not {"id", "emotion", "split"} <= set(rows[0]):
        raise ValueError(f"{str(path)!r} lacks the columns id, emotion, split")
    return rows


@register_dataset(INFO)
def load_iemocap(
    *,
    seed: int = 0,
    root: str | None = None,
    classes: int = 4,
    text: Literal["auto", "features", "transcript"] = "auto",
    modalities: list[str] | None = None,
    max_steps: int | None = None,
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
    val_fraction: float = 0.1,
    num_workers: int | str = "auto",
    max_items: int | None = None,
) -> MultimodalData:
    """IEMOCAP from a folder written by ``equimodal prepare iemocap``.

    ``classes`` 4 (neu, hap+exc, sad, ang) or 6 (hap, sad, neu, ang, exc, fru); ``text``
    picks the text modality: ``features`` (the prepared text features), ``transcript``
    (UTF-8 bytes of ``max_text_bytes``, for ``text_bow`` / ``hf_text``), or ``auto``
    (features when prepared, else the transcript). ``modalities`` keeps a subset;
    ``max_steps`` crops the sequences. Validation is the source's own split when it has
    one (MulT, MLA), else a stratified ``val_fraction`` of train for ``seed``.
    """
    base = prepared_root(root, "iemocap")
    if classes not in (4, 6):
        raise ValueError(f"classes must be 4 or 6, got {classes}")
    if text not in ("auto", "features", "transcript"):
        raise ValueError(f"text must be 'auto', 'features' or 'transcript', got {text!r}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or null, got {max_steps}")
    check_loader_options(num_workers, max_items, max_text_bytes)
    settings = read_prepare_json(base, "iemocap")["settings"]
    shapes = {m: tuple(s) for m, s in dict(settings.get("modalities") or {}).items()}
    if classes not in settings.get("emotion_classes", [4, 6]):
        raise ValueError(
            f"the {settings.get('source')} source of {str(base)!r} has only the 4-class labels; "
            "use dataset.options.classes=4"
        )
    missing = [str(base / TABLE)] if not (base / TABLE).is_file() else []
    for m in shapes:
        for name in (f"{m}.npy", f"{m}_mask.npy"):
            if not (base / "features" / name).is_file():
                missing.append(str(base / "features" / name))
    if missing:
        raise missing_files_error("iemocap", base, missing)
    table = _read_table(base / TABLE)
    if len(table) != int(settings.get("num_utterances", len(table))):
        raise ValueError(
            f"{str(base / TABLE)!r} has {len(table)} rows but prepare.json says "
            f"{settings.get('num_utterances')}; run prepare again with -o overwrite=true"
        )
    use_transcript = text == "transcript" or (text == "auto" and "text" not in shapes)
    if use_transcript and not settings.get("transcripts"):
        raise ValueError(
            f"{str(base)!r} has no transcripts (source {settings.get('source')}); use "
            "dataset.options.text=features"
        )
    available = [m for m in MODALITIES if m in shapes or (m == "text" and use_transcript)]
    wanted = list(modalities) if modalities is not None else available
    unknown = [m for m in wanted if m not in available]
    if unknown:
        raise ValueError(
            f"iemocap at {str(base)!r} has no modality {unknown[0]!r}; it has "
            f"{', '.join(available) or 'none'}"
        )
    names = [m for m in MODALITIES if m in wanted and m in available]
    if not names:
        raise ValueError("dataset 'iemocap': modalities is empty")
    feature_names = [m for m in names if not (m == "text" and use_transcript)]
    features, masks, steps = {}, {}, {}
    for m in feature_names:
        try:
            features[m] = np.load(base / "features" / f"{m}.npy", mmap_mode="r", allow_pickle=False)
            masks[m] = np.load(
                base / "features" / f"{m}_mask.npy", mmap_mode="r", allow_pickle=False
            )
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read the {m} features under {str(base)!r}: {err}") from None
        if features[m].shape[0] != len(table) or masks[m].shape != features[m].shape[:2]:
            raise ValueError(
                f"{str(base / 'features' / (m + '.npy'))!r} does not match {TABLE} "
                f"({features[m].shape[0]} rows, the table has {len(table)}); run prepare again"
            )
        steps[m] = min(features[m].shape[1], max_steps or features[m].shape[1])
    text_bytes = None
    if "text" in names and use_transcript:
        text_bytes = np.stack([encode_text(r.get("text") or "", max_text_bytes) for r in table])
    present_all = {m: np.asarray(masks[m]).any(1) for m in feature_names}
    if text_bytes is not None:
        present_all["text"] = text_bytes[:, 0] != 0
    some = np.logical_or.reduce([present_all[m] for m in names])
    rows_by_split: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    labels = np.full(len(table), -1, dtype=np.int64)
    for i, row in enumerate(table):
        label = class_index(row["emotion"], classes)
        if label is None or row["split"] not in rows_by_split or not some[i]:
            continue  # another emotion, or none of the chosen modalities is there
        labels[i] = label
        rows_by_split[row["split"]].append(i)
    if max_items is not None:
        rows_by_split = {s: r[:max_items] for s, r in rows_by_split.items()}
    train_rows = np.asarray(rows_by_split["train"], dtype=np.int64)
    test_rows = np.asarray(rows_by_split["test"], dtype=np.int64)
    if len(train_rows) < 2 or len(test_rows) == 0:
        raise ValueError(
            f"dataset 'iemocap' at {str(base)!r} has {len(train_rows)} train and "
            f"{len(test_rows)} test utterances of the {classes} classes; need at least 2 and 1"
        )
    if rows_by_split["val"]:
        val_rows = np.asarray(rows_by_split["val"], dtype=np.int64)
    else:
        train_rows, val_rows = hold_out_validation(
            "iemocap", train_rows, labels, val_fraction, seed, max_items is not None
        )
    specs, shape_of, dtypes = [], {}, {}
    for m in names:
        if m in features:
            shape_of[m] = (steps[m], features[m].shape[2] + 1)
            specs.append(ModalitySpec(m, shape_of[m], SEQUENCE_KIND))
        else:
            shape_of[m] = (max_text_bytes,)
            dtypes[m] = torch.uint8
            specs.append(ModalitySpec(m, shape_of[m], TEXT_KIND))
    reader = IemocapReader(features, masks, steps, text_bytes)

    def make(ids: np.ndarray) -> ItemSplit:
        return ItemSplit(
            ids.tolist(),
            reader,
            torch.from_numpy(labels[ids]),
            shape_of,
            dtypes=dtypes,
            present={m: torch.from_numpy(present_all[m][ids].copy()) for m in names},
            indices=torch.from_numpy(ids),
            num_workers=num_workers,
        )

    class_codes = CLASSES_4 if classes == 4 else CLASSES_6
    info = replace(
        INFO,
        modalities=tuple(specs),
        num_classes=classes,
        num_samples=int(len(train_rows) + len(val_rows) + len(test_rows)),
        class_names=tuple(CLASS_NAMES.get(c, c) if classes == 4 else c for c in class_codes),
    )
    return MultimodalData(
        info=info,
        train=make(train_rows),
        val=make(val_rows),
        test=make(test_rows),
        options={
            "root": str(root),
            "classes": classes,
            "text": "transcript" if use_transcript else "features",
            "modalities": names,
            "max_steps": max_steps,
            "max_text_bytes": max_text_bytes,
            "val_fraction": val_fraction,
            "max_items": max_items,
        },
    )
