"""The architecture holds: layers and no cycles, one registry with plugins, the recipes of
docs/architecture.md work as written, strategies keep to the model's public API."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from equimodal.core.registry import Registry, UnknownNameError

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "equimodal"
BUILTIN_STRATEGIES = (
    "agm",
    "amco",
    "cml",
    "decision_calibration",
    "gblending",
    "greedy",
    "joint",
    "lfm",
    "mbsd",
    "mla",
    "mmcosine",
    "mmpareto",
    "ogm_ge",
    "opm",
    "pmr",
    "reconboost",
    "relearning",
    "shapley_alternating",
    "udi",
    "umt",
    "unimodal",
    "valuation",
)


def _run(args: list[str], env_extra: dict[str, str] | None = None, cwd: Path | None = None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


# ---------------------------------------------------------------------- layers
def test_import_contracts_hold():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(lint).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    done = subprocess.run([lint], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_import_cycles_in_the_package():
    pytest.importorskip("grimp")
    done = _run([str(ROOT / "scripts" / "import_cycles.py"), "--src", str(ROOT / "src")])
    assert done.returncode == 0, done.stderr
    assert "0 import cycle(s)" in done.stdout, done.stdout


def test_no_strategy_name_outside_its_own_file():
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for name in BUILTIN_STRATEGIES:
            if path.parent.name == "strategies" and path.stem == name:
                continue
            for quoted in (f'"{name}"', f"'{name}'"):
                for line in text.splitlines():
                    code = line.split("#", 1)[0]
                    if quoted in code and "DEFAULT_STRATEGY =" not in code:
                        offenders.append(f"{path.relative_to(SRC)}: {line.strip()}")
    assert offenders == []


def test_strategies_use_only_the_models_public_api():
    internals = re.compile(r"\.fusion\.|\.encoders\[|\.projections\[|\.heads\[|\.fusion\b(?!_)")
    offenders = [
        f"{path.name}:{k + 1}: {line.strip()}"
        for path in (SRC / "strategies").glob("*.py")
        for k, line in enumerate(path.read_text(encoding="utf-8").splitlines())
        if internals.search(line.split("#", 1)[0]) and "fusion=" not in line
    ]
    assert offenders == []


# ---------------------------------------------------------------------- registry
def test_registry_finds_closest_name_and_refuses_duplicates():
    reg: Registry[object] = Registry("widget")
    reg.add("alpha", 1)
    reg.add("beta", 2)
    assert reg.names() == ["alpha", "beta"] and "alpha" in reg and reg.get("beta") == 2
    with pytest.raises(UnknownNameError, match="unknown widget 'alpah'; did you mean 'alpha'"):
        reg.get("alpah")
    with pytest.raises(KeyError):  # an UnknownNameError is a KeyError and a ValueError
        reg.get("gamma")
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("alpha", 3)
    reg.add("alpha", 3, replace=True)
    assert reg.get("alpha") == 3


def test_registering_a_strategy_before_the_first_lookup_keeps_the_builtins():
    code = textwrap.dedent(
        """
        import json
        from typing import Literal
        from equimodal.config import StrategyConfig
        from equimodal.strategies.base import Strategy, register_strategy

        class MineConfig(StrategyConfig):
            name: Literal["mine"] = "mine"

        @register_strategy
        class Mine(Strategy):
            name = "mine"
            config_class = MineConfig

        from equimodal.core.registries import STRATEGIES
        print(json.dumps(STRATEGIES.names()))
        """
    )
    done = _run(["-c", code])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == sorted([*BUILTIN_STRATEGIES, "mine"])


def test_a_broken_plugin_is_skipped_with_a_warning(tmp_path):
    site = tmp_path / "site"
    dist = site / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[equimodal.strategies]\nbad = no_such_module_xyz\n")
    code = "from equimodal.core.registries import STRATEGIES; print(len(STRATEGIES.names()))"
    done = _run(["-W", "always", "-c", code], {"PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(len(BUILTIN_STRATEGIES))
    assert "skipping strategy plugin 'bad'" in done.stderr


# ---------------------------------------------------------------------- recipes
def _recipes() -> dict[str, str]:
    """The code blocks of docs/architecture.md marked ``<!-- recipe: FILE -->``."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    found = re.findall(r"<!-- recipe: (\S+) -->\s*```python\n(.*?)```", text, re.S)
    return dict(found)


def test_the_documented_recipes_install_as_a_plugin_and_train_from_the_cli(tmp_path):
    recipes = _recipes()
    assert set(recipes) == {"scaled_joint.py", "two_views.py", "tiny_mlp.py"}
    site = tmp_path / "site"
    package = site / "example_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, code in recipes.items():
        (package / name).write_text(code)
    dist = site / "example_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: example-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[equimodal.strategies]\nscaled_joint = example_plugin.scaled_joint\n\n"
        "[equimodal.datasets]\ntwo_views = example_plugin.two_views\n\n"
        "[equimodal.encoders]\ntiny_mlp = example_plugin.tiny_mlp\n"
    )
    env = {"PYTHONPATH": str(site), "COLUMNS": "200"}
    listing = _run(["-m", "equimodal", "strategies"], env)
    assert listing.returncode == 0, listing.stderr
    assert "scaled_joint" in listing.stdout and "shapley_alternating" in listing.stdout
    done = _run(
        [
            "-m", "equimodal", "train", "-q", "--out", str(tmp_path / "runs"),
            "--dataset", "two_views", "--strategy", "scaled_joint", "--epochs", "3",
            "--set", "model.encoder={kind: tiny_mlp, width: 16}", "--set", "strategy.scale=2.0",
            "--set", "train.relative_edm=false",
        ],
        env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(
        (tmp_path / "runs" / "two_views-scaled_joint-s0" / "metrics.json").read_text()
    )
    assert metrics["strategy"] == "scaled_joint" and metrics["modalities"] == ["left", "right"]
    assert metrics["test"]["accuracy"] > 0.5  # three classes; the left view is strong
    config = (tmp_path / "runs" / "two_views-scaled_joint-s0" / "config.yaml").read_text()
    assert "kind: tiny_mlp" in config and "scale: 2.0" in config
    # a typo in the plugin's name is answered with the closest one, exit code 2
    typo = _run(["-m", "equimodal", "train", "--strategy", "scaled_jiont"], env)
    assert typo.returncode == 2 and "did you mean 'scaled_joint'" in typo.stderr
