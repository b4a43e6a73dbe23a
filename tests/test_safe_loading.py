"""Safe loading (issue 7, part 3): reading a file never runs code from it.

Malicious files carry a pickle payload whose ``__reduce__`` calls ``os.system`` to create a
marker file. Every reader must refuse them with a clear one-line error, and the marker
must never appear. A scan of the source tree guards against unsafe loader calls coming
back (``torch.load`` without ``weights_only=True``, ``np.load`` without
``allow_pickle=False``, ``yaml.load``, ``pickle.load``, ...).
"""

from __future__ import annotations

import ast
import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from equimodal.apps.cli import app
from equimodal.config import ConfigError, build_config, dump_config, load_yaml
from equimodal.engine.checkpoint import CheckpointError, read_checkpoint

from .conftest import small_overrides
from .test_bad_inputs import TINY, snapshot, write_cremad

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def pickled(marker: Path, how: str) -> bytes:
    """A malicious checkpoint: ``torch.save`` (zip) or plain-pickle bytes of a payload."""
    state = {"model/encoders.m0.net.0.weight": Payload(marker)}
    if how == "torch.save":
        import io

        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()
    return pickle.dumps(state, protocol=4)


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_the_payload_is_live(tmp_path):
    # the files below would run code if unpickled: the refusals are what stops them
    marker = tmp_path / "ran"
    pickle.loads(pickled(marker, "pickle"))
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("name", ["model.pt", "best.safetensors"])
def test_the_checkpoint_reader_refuses_pickles(tmp_path, how, name):
    marker = tmp_path / "ran"
    path = tmp_path / name
    path.write_bytes(pickled(marker, how))
    with pytest.raises(CheckpointError, match="never unpickles") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_evaluate_refuses_a_pickled_checkpoint(tmp_path, how):
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = build_config({}, small_overrides("joint", epochs=1))
    (run / "config.yaml").write_text(dump_config(config))
    checkpoint = run / "checkpoints" / "best.safetensors"
    checkpoint.write_bytes(pickled(marker, how))
    before = snapshot(run)
    result = runner.invoke(app, ["evaluate", str(run)])
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result)
    assert f"checkpoint '{checkpoint}' is a " in line and "never unpickles" in line
    assert not marker.exists()
    assert snapshot(run) == before


def test_resnet_weights_refuse_pickled_objects(tmp_path):
    from equimodal.models.resnet import read_state_dict

    marker = tmp_path / "ran"
    weights = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": Payload(marker)}, weights)
    with pytest.raises(ValueError, match="refusing resnet18 weights file") as info:
        read_state_dict(weights)
    assert "\n" not in str(info.value)
    # the same file named as an encoder's weights, from the command line
    root = tmp_path / "cremad"
    write_cremad(root)
    out = tmp_path / "runs"
    sets = [
        "dataset.name=cremad",
        f"dataset.options.root={root}",
        "dataset.options.frame_size=8",
        "dataset.options.val_fraction=0.5",
        "model.encoders.visual.kind=resnet18",
        f"model.encoders.visual.weights={weights}",
    ]
    argv = ["train", "-q", "--out", str(out), *TINY, *[x for s in sets for x in ("--set", s)]]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result)
    assert f"refusing resnet18 weights file '{weights}'" in line
    assert not out.exists()
    assert not marker.exists()


def test_yaml_config_is_read_with_the_safe_loader(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "run.yaml"
    config.write_text(f'seed: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(config)
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and len(error_lines(result)) == 1, result.output
    assert not marker.exists() and not (tmp_path / "r").exists()


def test_feature_files_with_pickled_objects_are_refused(tmp_path):
    from equimodal.data.registry import load_dataset

    marker = tmp_path / "ran"
    np.save(tmp_path / "a.npy", np.array([Payload(marker)] * 4, dtype=object), allow_pickle=True)
    (tmp_path / "labels.txt").write_text("x\ny\nx\ny\n")
    with pytest.raises(ValueError, match="a.npy': Object arrays cannot be loaded"):
        load_dataset("features", root=str(tmp_path))
    np.save(tmp_path / "a.npy", np.ones((4, 2)))
    np.save(tmp_path / "labels.npy", np.array([Payload(marker)] * 4, dtype=object))
    (tmp_path / "labels.txt").unlink()
    with pytest.raises(ValueError, match="labels.npy': Object arrays cannot be loaded"):
        load_dataset("features", root=str(tmp_path))
    assert not marker.exists()


# --------------------------------------------------------------------------- source scan
#: (module, function) pairs that unpickle or run code from a file whatever the arguments
FORBIDDEN = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("cPickle", "load"),
    ("cPickle", "loads"),
    ("dill", "load"),
    ("dill", "loads"),
    ("joblib", "load"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("shelve", "open"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
    ("yaml", "load"),
    ("yaml", "load_all"),
    ("yaml", "full_load"),
    ("yaml", "full_load_all"),
    ("yaml", "unsafe_load"),
    ("yaml", "unsafe_load_all"),
    ("torch.jit", "load"),
}
#: loaders that are safe only with this keyword set to this constant
NEEDS_KEYWORD = {
    ("torch", "load"): ("weights_only", True),
    ("np", "load"): ("allow_pickle", False),
    ("numpy", "load"): ("allow_pickle", False),
}
MODULES = {module for module, _ in FORBIDDEN | set(NEEDS_KEYWORD)}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Unsafe loader calls and imports in Python ``source``, as ``file:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom) and node.module in MODULES:
            for alias in node.names:
                if (node.module, alias.name) in FORBIDDEN | set(NEEDS_KEYWORD):
                    found.append(
                        f"{filename}:{node.lineno}: from {node.module} import {alias.name}"
                    )
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is None or "." not in name:
            continue
        key = tuple(name.rsplit(".", 1))
        if key in FORBIDDEN:
            found.append(f"{filename}:{node.lineno}: {name}()")
        elif key in NEEDS_KEYWORD:
            keyword, value = NEEDS_KEYWORD[key]
            given = {k.arg: k.value for k in node.keywords}
            ok = isinstance(given.get(keyword), ast.Constant) and given[keyword].value is value
            if not ok:
                found.append(f"{filename}:{node.lineno}: {name}() without {keyword}={value}")
    return sorted(found, key=lambda hit: int(hit.split(":")[1]))


def test_the_scan_catches_unsafe_calls():
    source = """
import pickle, yaml, torch, numpy as np
from pickle import loads
pickle.load(open("x", "rb"))
yaml.load(text, Loader=yaml.Loader)
torch.load("a.pt")
torch.load("a.pt", weights_only=False)
np.load("a.npy")
np.load("a.npy", allow_pickle=True)
yaml.safe_load(text)
torch.load("a.pt", map_location="cpu", weights_only=True)
np.load("a.npy", allow_pickle=False)
"""
    found = unsafe_loads(source)
    assert [f.split(": ", 1)[1] for f in found] == [
        "from pickle import loads",
        "pickle.load()",
        "yaml.load()",
        "torch.load() without weights_only=True",
        "torch.load() without weights_only=True",
        "np.load() without allow_pickle=False",
        "np.load() without allow_pickle=False",
    ]


def test_no_unsafe_loader_in_the_source_tree():
    files = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "scripts").rglob("*.py"))
    assert len(files) > 20
    found = [
        hit
        for path in files
        for hit in unsafe_loads(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    ]
    assert not found, "unsafe loaders:\n" + "\n".join(found)
