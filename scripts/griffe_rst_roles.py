"""A griffe extension for the documentation site (mkdocs.yml): the docstrings use
reStructuredText roles (``:class:`~equimodal.config.RunConfig```); the site renders them as
Markdown code spans (`` `RunConfig` ``) instead of showing the role's markup."""

from __future__ import annotations

import re
from typing import Any

import griffe

#: ``:class:`target```, ``:func:`~a.b.c```, ``:mod:`text <target>```
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|obj|exc|const):`([^`]+)`")


def _code(match: re.Match[str]) -> str:
    text = match.group(1).strip()
    if text.endswith(">") and "<" in text:  # `text <target>`: keep the text
        text = text[: text.index("<")].strip()
    elif text.startswith("~"):  # `~a.b.C`: the last name
        text = text[1:].rsplit(".", 1)[-1]
    return f"`{text}`"


def convert(text: str) -> str:
    """``text`` with every role replaced by a code span of its target."""
    return ROLE.sub(_code, text)


class RstRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value)
            stack.extend(m for m in obj.members.values() if not m.is_alias)
