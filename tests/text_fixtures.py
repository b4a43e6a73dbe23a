"""Tiny image-text and text-audio-video datasets written in the real raw layouts.

MVSA-Single: ``data/<id>.jpg`` (pillow) + ``data/<id>.txt`` (one of them Windows-1252,
one with a byte only Latin-1 decodes) + ``labelResultAll.txt``, optionally MLA's split
files. IEMOCAP: DialogueRNN's ``IEMOCAP_features.pkl``, MulT's ``iemocap_data.pkl``, and
the release's ``Session*/dialog`` transcripts and labels with per-utterance ``.npy``
features. Texts, colours and features depend on the class, so a model can learn.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .av_fixtures import class_color, write_jpg

MVSA_CLASSES = ("negative", "neutral", "positive")
WORDS = {
    "negative": ("awful", "hate", "sad", "terrible"),
    "neutral": ("the", "bus", "today", "report"),
    "positive": ("great", "love", "happy", "wonderful"),
}
# (text label, image label) -> label after the rule (None: dropped)
MVSA_PAIRS = (
    ("positive", "positive"),
    ("neutral", "positive"),
    ("positive", "neutral"),
    ("negative", "negative"),
    ("negative", "neutral"),
    ("neutral", "negative"),
    ("neutral", "neutral"),
    ("neutral", "neutral"),
    ("positive", "negative"),  # conflict: dropped
)


def mvsa_rule(text: str, image: str) -> str | None:
    """The community label rule, written out for the fixture's expectations."""
    if text == image:
        return text
    if "neutral" in (text, image):
        return image if text == "neutral" else text
    return None


def make_mvsa_raw(root: Path, repeats: int = 4, mla_splits: bool = False) -> dict[str, str]:
    """An MVSA-Single download: ``repeats`` x 9 posts; returns ``{id: label}`` of kept posts.

    Post 2 is Windows-1252 (curly quotes, e-acute), post 3 holds byte 0x81 (only Latin-1
    decodes it), post 4 starts with a UTF-8 byte-order mark. Images have several aspect
    ratios. With ``mla_splits`` the folder also has MLA's ``my_train.txt`` /
    ``my_test.txt`` (rows ``<id>.jpg <label>``, every fourth kept post in test).
    """
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    lines = ["ID\ttext,image"]
    kept: dict[str, str] = {}
    post = 0
    for r in range(repeats):
        for text_label, image_label in MVSA_PAIRS:
            post += 1
            words = WORDS[text_label]
            body = f"RT @user{post}: {words[r % 4]} {words[(r + 1) % 4]} #tag{post} :)"
            raw = body.encode("utf-8")
            if post == 2:
                raw = b"caf\xe9 \x93" + body.encode("ascii") + b"\x94"
            elif post == 3:
                raw = body.encode("ascii") + b" \x81"
            elif post == 4:
                raw = b"\xef\xbb\xbf" + raw + "\n\u00e9\u6f22 \U0001f600\n".encode()
            (data / f"{post}.txt").write_bytes(raw)
            size = ((64, 48), (40, 60), (50, 50))[post % 3]
            write_jpg(data / f"{post}.jpg", class_color(MVSA_CLASSES.index(image_label)), size)
            lines.append(f"{post}\t{text_label},{image_label}")
            label = mvsa_rule(text_label, image_label)
            if label is not None:
                kept[str(post)] = label
    (root / "labelResultAll.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if mla_splits:
        ids = list(kept)
        test = ids[3::4]
        train = [i for i in ids if i not in test]
        for name, part in (("my_train.txt", train), ("my_test.txt", test)):
            rows = [f"{i}.jpg {kept[i]}" for i in part]
            (root / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return kept


# --------------------------------------------------------------------------- IEMOCAP
DIALOGUE_RNN_LABELS = ("hap", "sad", "neu", "ang", "exc", "fru")
SAYINGS = {
    "hap": "that is wonderful news",
    "sad": "i miss her so much",
    "neu": "the form is on the desk",
    "ang": "do not yell at me",
    "exc": "wow we won the game",
    "fru": "why does this never work",
}


def _features(rng, code_index: int, dim: int, steps: int | None = None) -> np.ndarray:
    shape = (dim,) if steps is None else (steps, dim)
    x = rng.standard_normal(shape).astype(np.float32) * 0.5
    x[..., code_index % dim] += 2.0
    return x


def make_iemocap_dialoguernn(
    root: Path, per_dialogue: int = 6, train_dialogues: int = 4, test_dialogues: int = 2
) -> dict[str, int]:
    """DialogueRNN's ``IEMOCAP_features.pkl``: the 9-item tuple of per-dialogue dicts.

    Dialogues of sessions 1-4 are in ``trainVid``, session 5 in ``testVid``; labels cycle
    through the 6 classes; text 100-d, audio 100-d, visual 512-d vectors and transcripts.
    Returns the number of utterances per split.
    """
    rng = np.random.default_rng(0)
    ids, speakers, labels, text, audio, visual, sentences = {}, {}, {}, {}, {}, {}, {}
    train, test = [], []
    k = 0
    for d in range(train_dialogues + test_dialogues):
        session = 1 + d % 4 if d < train_dialogues else 5
        dialogue = f"Ses{session:02d}F_impro{d + 1:02d}"
        (train if d < train_dialogues else test).append(dialogue)
        ids[dialogue], speakers[dialogue], labels[dialogue] = [], [], []
        sentences[dialogue] = []
        rows = {"text": [], "audio": [], "visual": []}
        for u in range(per_dialogue):
            label = k % 6
            k += 1
            who = "FM"[u % 2]
            ids[dialogue].append(f"{dialogue}_{who}{u:03d}")
            speakers[dialogue].append(who)
            labels[dialogue].append(label)
            sentences[dialogue].append(SAYINGS[DIALOGUE_RNN_LABELS[label]] + f" {u}")
            rows["text"].append(_features(rng, label, 100))
            rows["audio"].append(_features(rng, label, 100))
            rows["visual"].append(_features(rng, label, 512))
        text[dialogue] = rows["text"]  # lists of vectors, as in the released file
        audio[dialogue] = np.stack(rows["audio"])
        visual[dialogue] = np.stack(rows["visual"])
    content = (ids, speakers, labels, text, audio, visual, sentences, train, test)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "IEMOCAP_features.pkl", "wb") as fh:
        pickle.dump(content, fh)
    return {
        "train": train_dialogues * per_dialogue,
        "test": test_dialogues * per_dialogue,
    }


def make_iemocap_mult(root: Path, sizes: dict[str, int] | None = None, steps: int = 8) -> int:
    """MulT's ``iemocap_data.pkl``: train / valid / test dicts of (N, T, d) sequences.

    Labels are one-vs-rest ``(N, 4, 2)`` over neutral, happy, sad, angry; sequences are
    left-padded with zero rows (the first ``i % 3`` steps); the first training sample has
    no emotion (left out by prepare); audio holds a ``-inf``. Returns the kept count.
    """
    rng = np.random.default_rng(1)
    sizes = sizes or {"train": 16, "valid": 6, "test": 6}
    content = {}
    kept = 0
    for split, n in sizes.items():
        labels = np.zeros((n, 4, 2), dtype=np.float32)
        parts = {"text": [], "audio": [], "vision": []}
        for i in range(n):
            c = i % 4
            labels[i, :, 0] = 1.0
            if not (split == "train" and i == 0):
                labels[i, c] = (0.0, 1.0)
                kept += 1
            for key, dim in (("text", 300), ("audio", 74), ("vision", 35)):
                x = _features(rng, c, dim, steps)
                x[: i % 3] = 0.0
                parts[key].append(x)
        content[split] = {k: np.stack(v) for k, v in parts.items()}
        content[split]["labels"] = labels
    content["train"]["audio"][1, -1, 0] = -np.inf
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "iemocap_data.pkl", "wb") as fh:
        pickle.dump(content, fh)
    return kept


RELEASE_EMOTIONS = ("neu", "hap", "exc", "sad", "ang", "fru", "xxx")


def make_iemocap_release(
    root: Path, sessions: tuple[int, ...] = (1, 2, 5), per_session: int = 7
) -> dict[str, str]:
    """The release's ``Session*/dialog/{EmoEvaluation,transcriptions}`` + feature .npy files.

    Audio features ``features/audio/<id>.npy`` are (T, 16) with T varying 3-7; visual
    ``features/visual/<id>.npy`` are 8-d vectors, missing for every third utterance (an
    absent modality); there are no text features (the transcripts are the text).
    Returns ``{id: emotion code}``.
    """
    rng = np.random.default_rng(2)
    out: dict[str, str] = {}
    for session in sessions:
        dialogue = f"Ses{session:02d}M_script01_1"
        base = root / f"Session{session}" / "dialog"
        (base / "EmoEvaluation").mkdir(parents=True, exist_ok=True)
        (base / "transcriptions").mkdir(parents=True, exist_ok=True)
        evaluation = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        transcript = []
        for u in range(per_session):
            name = f"{dialogue}_{'FM'[u % 2]}{u:03d}"
            code = RELEASE_EMOTIONS[(u + session) % len(RELEASE_EMOTIONS)]
            out[name] = code
            start, end = 1.5 * u, 1.5 * u + 1.2
            evaluation += [
                f"[{start:.4f} - {end:.4f}]\t{name}\t{code}\t[2.5000, 3.0000, 3.0000]",
                f"C-E1:\t{code};\t()",
                "",
            ]
            saying = SAYINGS.get(code, "mm hmm")
            transcript.append(f"{name} [{start:08.4f}-{end:08.4f}]: {saying}, {u}.")
            index = RELEASE_EMOTIONS.index(code)
            steps = 3 + (u % 5)
            (root / "features" / "audio").mkdir(parents=True, exist_ok=True)
            np.save(root / "features" / "audio" / f"{name}.npy", _features(rng, index, 16, steps))
            if u % 3 != 2:
                (root / "features" / "visual").mkdir(parents=True, exist_ok=True)
                np.save(root / "features" / "visual" / f"{name}.npy", _features(rng, index, 8))
        transcript.append("M: [BREATHING]")  # a line that is not an utterance
        (base / "EmoEvaluation" / f"{dialogue}.txt").write_text("\n".join(evaluation) + "\n")
        (base / "transcriptions" / f"{dialogue}.txt").write_text("\n".join(transcript) + "\n")
    return out
