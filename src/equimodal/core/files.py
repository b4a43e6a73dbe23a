"""Atomic file writes: a temporary file in the same folder, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    The bytes go to a temporary file in the same folder, which is synced and renamed over
    ``path``. On any failure (a full disk, a folder that is not writable) the temporary
    file is removed, ``path`` keeps its old content, and an ``OSError`` whose message names
    ``path`` is raised.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None:
            reason = err.strerror or os.strerror(err.errno)
            raise type(err)(err.errno, f"cannot write {str(path)!r}: {reason}") from err
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Atomic UTF-8 text write."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Atomic JSON write (indented, keys in insertion order)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
