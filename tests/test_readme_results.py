"""The README results table is the bench's own summary, byte for byte."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: each committed bench whose summary the README shows, with the reference of its comparisons
BENCHES = {"readme": "shapley_alternating", "balancebenchmark": "joint"}


@pytest.mark.parametrize("bench", sorted(BENCHES))
def test_readme_table_matches_the_bench_summary(bench):
    summary = ROOT / "results" / bench / "summary.md"
    if not summary.is_file():
        pytest.skip(f"results/{bench} is not in this checkout")
    start, end = f"<!-- results/{bench}/summary.md -->", f"<!-- end results/{bench}/summary.md -->"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert start in readme and end in readme, f"README lost the markers around results/{bench}"
    block = readme.split(start, 1)[1].split(end, 1)[0].strip()
    assert block == summary.read_text(encoding="utf-8").strip()


@pytest.mark.parametrize("bench", sorted(BENCHES))
def test_bench_summary_matches_its_run_folders(bench):
    from equimodal.apps.report import find_runs, load_metrics, summarize, summary_markdown
    from equimodal.apps.stats import compare_to_reference

    root = ROOT / "results" / bench
    if not (root / "summary.md").is_file():
        pytest.skip(f"results/{bench} is not in this checkout")
    metrics = [load_metrics(r) for r in find_runs(root)]
    rows = summarize(
        metrics, by_run_name=True, comparisons=compare_to_reference(metrics, BENCHES[bench])
    )
    table = summary_markdown(rows)
    assert table.strip() in (root / "summary.md").read_text(encoding="utf-8")


def test_committed_bench_file_is_the_one_the_readme_runs():
    """results/readme/bench.yaml (the bench's copy of its file) is, byte for byte, the bench
    file of the README's results command, and that command writes results/readme."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "\n## Results\n" in readme, "README lost its Results section"
    section = readme.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"equimodal bench (configs/bench/\S+\.yaml)[^\n]*?--out (\S+)", section)
    assert len(commands) == 1, f"want one `equimodal bench FILE ... --out DIR`, got {commands}"
    config, out = commands[0]
    assert out == "results/readme", f"README bench writes {out}; the tests read results/readme"
    copy = ROOT / out / "bench.yaml"
    if not (ROOT / out / "summary.md").is_file():
        pytest.skip(f"{out} is not in this checkout")
    assert copy.is_file(), f"{out}/bench.yaml is missing"
    assert copy.read_bytes() == (ROOT / config).read_bytes(), (
        f"{out}/bench.yaml differs from {config}: the committed runs are not from that file"
    )


def test_the_balancebenchmark_table_comes_from_its_committed_bench_file():
    """The README's second table: its command's bench file is the committed copy's."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = "equimodal bench configs/bench/balancebenchmark.yaml --jobs 2 --out "
    assert command + "results/balancebenchmark" in readme
    copy = ROOT / "results" / "balancebenchmark" / "bench.yaml"
    if not copy.is_file():
        pytest.skip("results/balancebenchmark is not in this checkout")
    config = ROOT / "configs" / "bench" / "balancebenchmark.yaml"
    assert copy.read_bytes() == config.read_bytes()
