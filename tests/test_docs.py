"""The code of the documentation pages runs: each page's fenced ``python`` blocks, in order,
in one namespace, in an empty working directory.

A block fenced as ```` ```python no-run ```` is shown on the page but not run (code that
needs a GPU, a download or a long run). Blocks fenced with another language (``text``,
``bash``, ``yaml``) are never run. To test a new page, add its path to ``DOC_PAGES``.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

#: the pages whose ```python blocks must run, relative to the repository root
DOC_PAGES = ["docs/tutorial.md", "docs/python.md"]

#: an opening fence (three or more backticks, or tildes), its info string, the body and
#: the matching closing fence
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)\n"
    r"(?P<body>.*?)"
    r"^(?P=indent)(?P=fence)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ``(line number, code)`` of each block to run: fenced ``python`` (or ``py``)
    without ``no-run`` in its info string."""
    blocks = []
    for match in FENCE.finditer(text):
        words = match["info"].strip().lower().split()
        if not words or words[0] not in ("python", "py") or "no-run" in words[1:]:
            continue
        indent = len(match["indent"])
        code = "\n".join(line[indent:] for line in match["body"].splitlines())
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, code))
    return blocks


def test_python_blocks_are_found():
    text = (
        "intro\n```python\na = 1\n```\n```text\nnot code\n```\n"
        "```python no-run\nraise SystemExit\n```\n````py\nb = a + 1\n````\n"
    )
    assert python_blocks(text) == [(2, "a = 1"), (11, "b = a + 1")]


@pytest.fixture
def one_thread():
    """The pages train tiny models: on a busy machine more threads only cost time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("page", DOC_PAGES)
def test_page_code_runs(page, tmp_path, monkeypatch, one_thread):
    path = ROOT / page
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    assert blocks, f"{page} has no ```python block to run"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__main__"}
    for number, (line, code) in enumerate(blocks, 1):
        try:
            exec(compile(code, f"{page}:block {number} (line {line})", "exec"), namespace)
        except Exception:
            pytest.fail(
                f"{page}, python block {number} (line {line}) failed:\n"
                + traceback.format_exc(limit=-3),
                pytrace=False,
            )
