"""Writing files safely: atomically, honouring the umask, and as strict JSON.

* :func:`write_bytes_atomic` (and the text and JSON forms): a temporary file in the same
  folder, synced, then renamed over the target, so readers see the old file or the new
  one, never half of one. The file gets the mode an ordinary ``open()`` would give it
  (``0o666`` less the process umask: ``0644`` under umask ``022``), so colleagues on a
  shared server can read results.
* :func:`atomic_output`: the same for a file or folder that other code writes (a figure,
  a folder of frames): write to the yielded temporary path, renamed on success.
* :func:`dumps_json`: strict JSON (RFC 8259): a non-finite float (NaN, infinity) becomes
  ``null`` instead of a bare ``NaN`` token that strict readers reject.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting it and restoring it, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    The bytes go to a temporary file in the same folder, which is synced and renamed over
    ``path``; the file's mode is what ``open()`` would give (the umask applies). On any
    failure (a full disk, a file-size limit, a folder that is not writable) the temporary
    file is removed, ``path`` keeps its old content, and an ``OSError`` whose message names
    ``path`` is raised.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600
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


def to_strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None and NumPy scalars and arrays
    turned into Python numbers and lists (tuples become lists)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: to_strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_strict_json(v) for v in obj]
    if hasattr(obj, "tolist") and type(obj).__module__ == "numpy":
        return to_strict_json(obj.tolist())
    return obj


def dumps_json(obj: Any, **options: Any) -> str:
    """``json.dumps`` of :func:`to_strict_json` (``allow_nan=False``: strict JSON)."""
    return json.dumps(to_strict_json(obj), allow_nan=False, **options)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Atomic strict-JSON write (indented, keys in insertion order, NaN/inf as null)."""
    write_text_atomic(path, dumps_json(obj, indent=2) + "\n")


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only on success.

    The caller writes a file or a whole folder at the temporary path (e.g. ``savefig``
    with an explicit ``format``). A file or folder already at the temporary path (a partial
    output of a killed run) is removed first, and the temporary path is removed again if
    the body raises, so no partial output is ever left under ``path``'s name.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    _remove(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        _remove(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def save_figure(fig: Any, path: str | Path, **options: Any) -> Path:
    """``fig.savefig`` to ``path`` atomically (format from the suffix); returns ``path``."""
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **options)
    return path
