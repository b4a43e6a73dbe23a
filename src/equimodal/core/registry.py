"""One registry for every extension point: strategies, datasets, preparers, encoders, fusions.

A :class:`Registry` maps names to objects. Code registers with a decorator, looks up with
:meth:`Registry.get` (an unknown name raises :class:`UnknownNameError`, which names the
closest valid one) and lists with :meth:`Registry.names`. The built-ins are modules that
register their objects when imported; they are imported lazily, on the first lookup or
listing, so that importing a registry is cheap and no layer has to import the modules that
fill it. Third-party packages add objects through entry points (``[project.entry-points]``
in their ``pyproject.toml``): an entry point may name a module (importing it registers its
objects) or an object, which is registered under the entry point's name.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered; the message names the closest valid one.

    It is a ``KeyError`` (a failed lookup) and a ``ValueError`` (a bad value in a config),
    so callers written for either keep working; ``str()`` gives the message unquoted.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def closest_name(name: str, choices: Sequence[str]) -> str:
    """A hint naming the closest valid choice, or listing them all."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    if close:
        return f"did you mean {close[0]!r}?"
    return "choose one of: " + ", ".join(sorted(choices))


class Registry(Generic[T]):
    """Names to objects of one kind, with lazily imported built-ins and entry-point plugins.

    ``kind`` names the objects in messages ("strategy", "dataset"). ``builtins`` are module
    paths imported on first use (a module that cannot be found is skipped: optional parts
    of the tree); ``group`` is the entry-point group of third-party plugins (None: none).
    Registering before the first lookup does not hide the built-ins: they are loaded on
    the first lookup or listing whatever was registered before.
    """

    def __init__(
        self,
        kind: str,
        builtins: Sequence[str] = (),
        group: str | None = None,
        plugin_objects: bool = True,
    ) -> None:
        self.kind = kind
        self.builtins = tuple(builtins)
        self.group = group
        #: False: the group's entry points are modules only (another registry of the same
        #: group registers the objects they name)
        self.plugin_objects = plugin_objects
        self._items: dict[str, T] = {}
        self._loaded = False
        self._loading = False

    # ------------------------------------------------------------------ registering
    def register(self, name: str | None = None, *, replace: bool = False) -> Callable[[T], T]:
        """Decorator registering an object under ``name`` (default: its ``name`` attribute).

        Registering a taken name is an error unless ``replace`` is true (for tests and for
        a plugin that deliberately overrides a built-in).
        """

        def decorate(obj: T) -> T:
            self.add(name if name is not None else _own_name(obj, self.kind), obj, replace)
            return obj

        return decorate

    def add(self, name: str, obj: T, replace: bool = False) -> None:
        """Register ``obj`` under ``name`` (see :meth:`register`)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._items and not replace and self._items[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj

    def remove(self, name: str) -> None:
        """Unregister ``name`` (no error when it is not registered)."""
        self._items.pop(name, None)

    # ------------------------------------------------------------------ looking up
    def get(self, name: str) -> T:
        """The object registered as ``name``; :class:`UnknownNameError` otherwise."""
        self.load()
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        """``unknown <kind> 'x'; did you mean 'y'?`` (or the list of valid names)."""
        names = self.names()
        if not names:
            return f"unknown {self.kind} {name!r}; none is registered"
        return f"unknown {self.kind} {name!r}; {closest_name(str(name), names)}"

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self.load()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """``(name, object)`` pairs sorted by name."""
        self.load()
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        """Import the built-in modules, then the plugins' entry points (once)."""
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            for module in self.builtins:
                _import_optional(module)
            if self.group is not None:
                self._load_plugins()
            self._loaded = True
        finally:
            self._loading = False

    def _load_plugins(self) -> None:
        for entry in importlib.metadata.entry_points(group=self.group):
            try:
                obj = entry.load()
            except Exception as exc:  # a broken plugin must not break the built-ins
                warnings.warn(
                    f"equimodal: skipping {self.kind} plugin {entry.name!r} "
                    f"({entry.value}): {type(exc).__name__}: {exc}",
                    stacklevel=3,
                )
                continue
            if isinstance(obj, ModuleType) or not self.plugin_objects or entry.name in self._items:
                continue  # a module registered its objects when it was imported
            self.add(entry.name, obj)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._items)} registered)"


def _own_name(obj: Any, kind: str) -> str:
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{obj!r} has no name; register it as {kind} with register(name)")
    return name


def _import_optional(module: str) -> None:
    if module in sys.modules:
        return
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if found:
        importlib.import_module(module)
