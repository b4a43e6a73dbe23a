"""equimodal diagnose: the lazy modality named in plain words, HTML and Markdown reports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from equimodal.apps.cli import app

from .conftest import small_overrides


@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    runner = CliRunner()
    sets = [a for o in small_overrides("joint", 3) for a in ("--set", o)]
    result = runner.invoke(
        app, ["train", "-q", "--out", str(root), "--name", "r", "--fusion", "concat", *sets]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["diagnose", str(root / "r"), "--draws", "2"])
    assert result.exit_code == 0, result.output
    return root / "r" / "diagnose", result.output


def test_summary_names_the_minor_modality_with_its_numbers(diagnosed):
    folder, output = diagnosed
    data = json.loads((folder / "diagnosis.json").read_text())
    shares = data["splits"]["test"]["shapley_share"]
    minor = min(shares, key=shares.get)
    text = " ".join(output.split())
    assert f"{minor} is a minor modality: {100 * shares[minor]:.0f} % of the contribution" in text
    assert f"against a {100 / 3:.0f} % equal share" in text
    assert "Without m0 (the best single modality: " in text  # the synthetic data's strong one
    # no unimodal runs were cached (relative EDM off): a linear probe measured the ability
    assert "linear probe" in data["ability_source"]
    assert set(data["ability"]) == {"m0", "m1", "m2"}


def test_markdown_and_html_hold_tables_and_images(diagnosed):
    folder, _ = diagnosed
    md = (folder / "report.md").read_text()
    for section in (
        "## Summary",
        "## Contributions",
        "## Balance",
        "## Decision layer (test)",
        "## Robustness (test)",
    ):
        assert section in md
    for png in ("shares.png", "decision.png", "per_class.png", "robustness.png"):
        assert f"]({png})" in md and (folder / png).stat().st_size > 5000
    page = (folder / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4 and all(len(i) > 5000 for i in images)  # self-contained
    assert "<h2>Summary</h2>" in page and 'src="http' not in page


def test_diagnose_missing_run_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["diagnose", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render(page, shot):
    """Screenshot ``page`` in headless Chromium; returns its console lines."""
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1000,3000",
            "--enable-logging=stderr",
            "--v=0",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_html_report_renders_in_headless_chromium(diagnosed, tmp_path):
    folder, _ = diagnosed
    shot = tmp_path / "shot.png"
    console = render(folder / "report.html", shot)
    assert shot.is_file() and shot.stat().st_size > 20_000
    assert console == []
    # the check can fail: a page with a script error is caught
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>throw new Error('kaboom')</script></body></html>")
    assert any("kaboom" in line for line in render(broken, tmp_path / "b.png"))


def test_diagnose_reports_each_step_as_it_starts(diagnosed):
    _, output = diagnosed
    text = " ".join(output.split())
    for step in ("loading the run", "Shapley values and EDM", "robustness: missing modalities"):
        assert f"diagnose: {step}" in text
