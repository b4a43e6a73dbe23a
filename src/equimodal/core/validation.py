"""Pydantic validation errors as one line: the key path, the problem, the closest valid key."""

from __future__ import annotations

import difflib
import reprlib
from typing import Any

from pydantic import BaseModel, ValidationError


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid keys of the section reached by following ``loc`` from ``model``."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        current = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


#: how much of a bad value a message shows: a 10 MB string or a YAML alias bomb of a
#: billion list items is shown in a few dozen characters
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 100
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = _SHORT.maxdict = 8
_SHORT.maxlevel = 3


def show(value: Any) -> str:
    """A short one-line repr of a bad value for an error message."""
    return _SHORT.repr(value)


def _key(part: Any) -> str:
    """One part of a key path: as is when printable, else its repr (no line breaks)."""
    text = str(part)
    return text if text.isprintable() else repr(text)


def format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    """The first error of ``err`` as one line: key path, problem, closest valid key."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    path = ".".join(_key(p) for p in loc) or "<root>"
    if first["type"] == "extra_forbidden":
        valid = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else "valid keys: " + ", ".join(valid)
        return f"unknown key {show('.'.join(str(p) for p in loc))}; {hint}"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    extra = ""
    if (
        "input" in first
        and first["type"] not in ("missing",)
        and not isinstance(first["input"], dict)
    ):
        extra = f" (got {show(first['input'])})"
    text = f"{msg}{extra}" if not loc else f"{path}: {msg}{extra}"
    return " ".join(text.splitlines())  # one line, whatever a validator's message holds
