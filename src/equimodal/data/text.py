"""Text as a modality: UTF-8 bytes in a fixed-length ``uint8`` row, and reading text files.

A sample's text travels through datasets, batches and the trainer as a ``uint8`` tensor of
shape ``(max_text_bytes,)``: its UTF-8 bytes, cut at a character boundary when longer and
zero-padded (``ModalitySpec`` kind ``"text"``); the text encoders
(:mod:`equimodal.models.text`) decode and tokenize inside. Files that are not valid UTF-8
are decoded by :func:`decode_bytes` (UTF-8, else Windows-1252, else Latin-1).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import torch

#: default length of a stored text in bytes (a tweet or an utterance fits easily)
DEFAULT_MAX_TEXT_BYTES = 512


def clean_text(text: str) -> str:
    """``text`` without control characters, whitespace runs collapsed to one space, stripped.

    Control characters (Unicode category Cc: NUL, the C1 range that Latin-1 decoding of
    stray bytes produces, ...) become spaces.
    """
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    return " ".join(text.split())


def decode_bytes(data: bytes) -> tuple[str, str]:
    """``(text, encoding)``: UTF-8 if valid, else Windows-1252, else Latin-1.

    A UTF-8 byte-order mark is dropped. Latin-1 maps every byte to a character, so this
    never fails; ``encoding`` says which decoder was used (``utf-8``, ``cp1252``,
    ``latin-1``).
    """
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(encoding), "utf-8" if encoding == "utf-8-sig" else encoding
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1"), "latin-1"


def read_text_file(path: str | Path) -> tuple[str, str]:
    """``(cleaned text, encoding)`` of a text file, decoded by :func:`decode_bytes`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"text file {str(path)!r} does not exist") from None
    except OSError as err:
        raise ValueError(f"cannot read text file {str(path)!r}: {err.strerror or err}") from None
    text, encoding = decode_bytes(data)
    return clean_text(text), encoding


def encode_text(text: str, max_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> np.ndarray:
    """``text`` as ``uint8`` UTF-8 bytes of length ``max_bytes``, zero-padded.

    A longer text is cut at the last character boundary that fits (never inside a
    multi-byte character); NUL characters are dropped.
    """
    if max_bytes < 1:
        raise ValueError(f"max_text_bytes must be positive, got {max_bytes}")
    data = text.replace("\x00", "").encode("utf-8")
    if len(data) > max_bytes:
        data = data[:max_bytes].decode("utf-8", errors="ignore").encode("utf-8")
    out = np.zeros(max_bytes, dtype=np.uint8)
    out[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return out


def decode_text(row: np.ndarray | torch.Tensor) -> str:
    """The text held by one ``uint8`` row (bytes up to the first zero)."""
    if isinstance(row, torch.Tensor):
        row = row.detach().cpu().numpy()
    data = np.asarray(row).astype(np.uint8, copy=False).tobytes()
    return data.split(b"\x00", 1)[0].decode("utf-8", errors="replace")


def decode_batch(x: torch.Tensor) -> list[str]:
    """Texts of a ``(B, max_text_bytes)`` batch (any integer or float dtype holding bytes)."""
    if x.dim() != 2:
        raise ValueError(
            f"text input must be (B, max_text_bytes) bytes, got shape {tuple(x.shape)}"
        )
    rows = x.detach().cpu()
    if rows.dtype != torch.uint8:
        rows = rows.round().clamp(0, 255).to(torch.uint8)
    return [decode_text(r) for r in rows.numpy()]
