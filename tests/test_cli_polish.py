"""What the command line shows: help, version, completion, listings that fit 80 columns,
summaries on a terminal and in files, plots and the diagnose report."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

import equimodal
from equimodal.apps import cli
from equimodal.apps.cli import app

runner = CliRunner()
COMMANDS = sorted(app.registered_commands, key=lambda c: c.callback.__name__)
NAMES = [c.name or c.callback.__name__ for c in COMMANDS]


def invoke(*args: str, columns: int = 80):
    return runner.invoke(app, list(args), env={"COLUMNS": str(columns)}, catch_exceptions=False)


def console(terminal: bool, width: int = 80) -> Console:
    """A stand-in for the CLI's stdout console: a terminal or a file, ``width`` wide."""
    return Console(emoji=False, width=width, force_terminal=terminal, color_system=None)


# --------------------------------------------------------------------------- help, version
def test_bare_command_prints_the_help_and_exits_0():
    result = invoke()
    assert result.exit_code == 0, result.output
    assert "Missing command" not in result.output
    assert "Commands" in result.output and "Usage: equimodal" in result.output
    for name in ("train", "report", "datasets", "strategies"):
        assert name in result.output


@pytest.mark.parametrize("command", [None, *NAMES])
def test_help_shows_no_type_after_a_flag(command):
    result = invoke(*([command] if command else []), "--help", columns=200)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    for line in result.output.splitlines():
        if re.search(r"--(help|quiet|plots|markdown|competition|robustness|version)\b", line):
            assert "<" not in line.split("--", 1)[1].split("  ", 1)[0], line


def test_repeatable_options_name_their_value():
    for command, option in (("train", "--set"), ("prepare", "--option")):
        text = invoke(command, "--help", columns=200).output
        (line,) = [x for x in text.splitlines() if option in x]
        assert "KEY=VALUE" in line and "list[str]" not in line


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output == f"equimodal {equimodal.__version__}\n"
    # the console script's way in, in a fresh interpreter
    proc = subprocess.run(
        [sys.executable, "-m", "equimodal", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout == f"equimodal {equimodal.__version__}\n"


def test_shell_completion_is_offered():
    text = invoke("--help", columns=200).output
    assert "--install-completion" in text and "--show-completion" in text
    result = invoke("--show-completion", "bash")
    assert result.exit_code == 0, result.output
    assert "complete" in result.output and "_EQUIMODAL_COMPLETE" in result.output


# --------------------------------------------------------------------------- listings
def _entries(output: str) -> dict[str, list[str]]:
    """``name -> its lines`` of a listing (a name alone on an unindented line)."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines()[1:]:
        if line and not line.startswith(" "):
            current = entries.setdefault(line.strip(), [])
        elif current is not None and line.strip():
            current.append(line.strip())
    return entries


@pytest.mark.parametrize("command", ["datasets", "strategies"])
def test_listing_fits_80_columns_with_whole_names(command):
    from equimodal.data.registry import dataset_names
    from equimodal.strategies import strategy_names

    result = invoke(command)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    names = dataset_names() if command == "datasets" else strategy_names()
    assert sorted(_entries(result.output)) == sorted(names)
    for name in names:  # each on a line of its own, unbroken
        assert name in [line.strip() for line in lines]
    assert "``" not in result.output  # reST code marks stripped


def test_strategy_descriptions_are_one_plain_sentence():
    entries = _entries(invoke("strategies").output)
    joint = " ".join(entries["joint"])
    assert "CE(fused logits, y)" in joint and "``" not in joint
    for lines in entries.values():
        text = " ".join(lines)
        assert "module doc" not in text  # "; see the module doc" pointers dropped
    assert any("options" in x and "alpha=1.0" in x for x in entries["agm"])


def test_datasets_of_the_users_copy_show_no_zero_size():
    entries = _entries(invoke("datasets").output)
    (samples,) = [x for x in entries["kinetics_sounds"] if x.startswith("samples")]
    assert "varies" in samples and "0" not in samples
    (samples,) = [x for x in entries["features"] if x.startswith("samples")]
    assert "varies" in samples
    (samples,) = [x for x in entries["mfeat"] if x.startswith("samples")]
    assert samples.split()[-1] == "2000"


# --------------------------------------------------------------------------- summaries
def _fake_run(root, dataset, method, seed, accuracy, epochs=3, modalities=("a", "b")):
    """A finished run folder as ``equimodal train`` leaves it, without training."""
    run = root / dataset / f"{method}-s{seed}"
    run.mkdir(parents=True)
    share = {m: 1 / len(modalities) for m in modalities}
    metrics = {
        "run": method,
        "dataset": dataset,
        "strategy": method,
        "fusion": "concat",
        "seed": seed,
        "modalities": list(modalities),
        "train_time_s": 1.5 + seed,
        "test": {
            "accuracy": accuracy,
            "macro_f1": accuracy - 0.01,
            "edm": 0.1,
            "relative_edm": 0.05,
            "shapley_share": share,
        },
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    history = [
        {
            "epoch": e,
            "train": {"loss": 1.0 / e},
            "val": {"accuracy": 0.5 + e / 10, "macro_f1": 0.5, "edm": 0.1, "shapley_share": share},
        }
        for e in range(1, epochs + 1)
    ]
    (run / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return run


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    methods = ("shapley_alternating", "decision_calibration", "joint")
    for k, method in enumerate(methods):
        for seed in (0, 1):
            _fake_run(root, "mfeat", method, seed, 0.9 + 0.01 * k + 0.005 * seed)
    _fake_run(root, "htad", "joint", 0, 0.8)  # one seed
    (root / "bench.yaml").write_text("reference: shapley_alternating\n")
    return root


def test_report_on_a_terminal_is_tables_that_fit(runs, monkeypatch):
    monkeypatch.setattr(cli, "out", console(terminal=True, width=80))
    out_file = runs.parent / "summary.md"
    result = invoke("report", str(runs), "--no-markdown", "--out", str(out_file))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "|---" not in result.output and "| mfeat |" not in result.output  # not Markdown
    for method in ("shapley_alternating", "decision_calibration", "joint"):
        assert any(line.split()[:1] == [method] for line in lines), method  # whole names
    assert "mfeat: test scores, mean ± std over seeds" in result.output
    assert "Left out at 80 columns:" in result.output
    # the file stays Markdown
    assert out_file.read_text().startswith("| dataset | method | seeds |")


def test_report_on_a_wide_terminal_shows_every_column(runs, monkeypatch):
    monkeypatch.setattr(cli, "out", console(terminal=True, width=250))
    result = invoke("report", str(runs), "--no-markdown")
    assert result.exit_code == 0, result.output
    assert "Left out" not in result.output
    assert "Shapley share" in result.output and "a 50, b 50" in result.output


def test_bench_summary_on_a_terminal_has_the_comparisons_and_their_note(runs, monkeypatch):
    import io

    from equimodal.apps.report import (
        comparison_note,
        find_runs,
        load_metrics,
        summarize,
        summary_markdown,
    )
    from equimodal.apps.stats import compare_to_reference

    metrics = [load_metrics(r) for r in find_runs(runs)]
    comparisons = compare_to_reference(metrics, "shapley_alternating")
    rows = summarize(metrics, by_run_name=True, comparisons=comparisons)
    note = comparison_note("shapley_alternating")
    for width, shown in ((250, True), (80, False)):
        buffer = io.StringIO()
        terminal = Console(file=buffer, width=width, force_terminal=True, color_system=None)
        monkeypatch.setattr(cli, "out", terminal)
        cli._print_summary(rows, summary_markdown(rows), note)
        text = buffer.getvalue()
        assert max(len(line) for line in text.splitlines()) <= width
        tables = text.split("Left out")[0]
        # the note explains the Δ and p columns: printed with them, not without
        assert ("p (Holm)" in tables) is shown and ("paired t-test" in text) is shown
        assert ("Left out" in text) is not shown
        assert "decision_calibration" in tables  # whole, at either width


def test_report_into_a_file_or_pipe_is_markdown(runs, monkeypatch):
    monkeypatch.setattr(cli, "out", console(terminal=False))
    result = invoke("report", str(runs), "--no-markdown")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("| dataset | method | seeds |") and lines[1].startswith("|---|")
    # a long row stays one line (no wrapping inside the Markdown table)
    assert all(line.startswith("|") and line.endswith("|") for line in lines if line)


def test_one_seed_shows_the_mean_without_a_zero_std(runs):
    from equimodal.apps.report import find_runs, load_metrics, summarize, summary_markdown

    rows = summarize([load_metrics(r) for r in find_runs(runs)], by_run_name=True)
    table = summary_markdown(rows).splitlines()
    (htad,) = [line for line in table if line.startswith("| htad |")]
    assert "| htad | joint | 1 | 80.00 | 79.00 | 10.0 | 5.0 |" in htad
    assert "±" not in htad and "+-" not in htad
    (mfeat,) = [line for line in table if line.startswith("| mfeat | joint |")]
    assert "| mfeat | joint | 2 | 92.25 ± 0.35 |" in mfeat


def test_report_sentence_of_one_seed(tmp_path):
    from equimodal.apps.report import write_report

    _fake_run(tmp_path, "mfeat", "joint", 0, 0.9)
    text = write_report(tmp_path).read_text()
    assert "one seed per method, so no standard deviation" in text
    assert "±" not in text


# --------------------------------------------------------------------------- plots
def _integer_ticks(ax) -> bool:
    lo, hi = sorted(ax.get_xlim())
    ticks = [t for t in ax.get_xticks() if lo - 1e-9 <= t <= hi + 1e-9]
    return bool(ticks) and all(math.isclose(t, round(t)) for t in ticks)


def test_epoch_axes_tick_whole_epochs(tmp_path, monkeypatch):
    from equimodal.apps import report

    figures = {}
    monkeypatch.setattr(report, "save_figure", lambda fig, path, **kw: figures.update({path: fig}))
    runs = [_fake_run(tmp_path, "mfeat", m, 0, 0.9, epochs=3) for m in ("joint", "agm")]
    report.plot_run(runs[0], tmp_path / "single")
    report.plot_comparison(runs, tmp_path / "many", by_run_name=True)
    epoch_figures = {p.name: f for p, f in figures.items() if "accuracy_vs_edm" not in p.name}
    assert sorted(epoch_figures) == [
        "curves.png",
        "edm.png",
        "mfeat_balance_per_epoch.png",
        "shapley.png",
    ]
    for name, fig in epoch_figures.items():
        for ax in fig.axes:
            assert _integer_ticks(ax), (name, list(ax.get_xticks()))


# --------------------------------------------------------------------------- diagnose
def test_per_class_heatmap_labels_every_cell():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from equimodal.apps.diagnose import per_class_figure

    grid = np.array([[12.5, 80.0, np.nan], [100.0, 0.0, 55.0]])
    fig = per_class_figure(grid, ["audio", "video"], ["c0", "c1", "c2"])
    ax = fig.axes[0]
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert len(cells) == 6
    assert cells[(0, 0)].get_text() == "12" and cells[(0, 1)].get_text() == "80"
    assert cells[(0, 2)].get_text() == "-" and cells[(1, 0)].get_text() == "100"
    # readable on the colormap: light text on dark (low) cells, dark on light (high) ones
    assert cells[(1, 1)].get_color() == "white" and cells[(1, 0)].get_color() == "black"
    plt.close(fig)


def _diagnosis(draws=5, source="validation accuracy of a linear probe on the frozen features"):
    from equimodal.apps.diagnose import Diagnosis

    split = {
        "accuracy": 0.9,
        "macro_f1": 0.89,
        "edm": 0.3,
        "shapley": {"m0": 0.3, "m1": 0.05},
        "shapley_share": {"m0": 0.85, "m1": 0.15},
    }
    robustness = {
        "modalities": ["m0", "m1"],
        "full": {"accuracy": 0.9},
        "subsets": [
            {"modalities": ["m0"], "accuracy": 0.85},
            {"modalities": ["m1"], "accuracy": 0.4},
        ],
        "missing": [{"eta": 0.5, "accuracy": 0.7, "accuracy_std": 0.0 if draws < 2 else 0.02}],
        "noise": [{"sigma": 1.0, "accuracy": 0.6, "accuracy_std": 0.0 if draws < 2 else 0.03}],
        "draws": draws,
        "strongest_removed": {"modality": "m0", "alone": 0.85, "without": 0.4},
    }
    return Diagnosis(
        run="r",
        dataset="synthetic",
        strategy="joint",
        modalities=["m0", "m1"],
        class_names=["a", "b"],
        splits={"val": split, "test": split},
        ability={"m0": 0.8, "m1": 0.55},
        ability_source=source,
        decision={},
        robustness=robustness,
    )


def test_diagnose_summary_says_what_each_number_is():
    from equimodal.apps.diagnose import plain_summary

    text = " ".join(plain_summary(_diagnosis()))
    assert "m1 is a minor modality: 15 % of the contribution against a 50 % equal share; " in text
    assert "a linear probe on its features reaches 55 % validation accuracy" in text
    assert (
        "Without m0 (the best single modality: 85.0 % test accuracy when the model reads only "
        "m0), test accuracy falls from 90.0 % to 40.0 %." in text
    )
    assert "alone" not in text  # two different numbers no longer share one word
    cached = " ".join(
        plain_summary(_diagnosis(source="validation accuracy of a unimodal model per modality"))
    )
    assert "a unimodal model of it reaches 55 % validation accuracy" in cached


def test_diagnose_robustness_of_one_draw_has_no_spread():
    from equimodal.apps.diagnose import _tables

    def cells(d):
        (rows,) = [rows for title, _, rows in _tables(d) if title == "Robustness (test)"]
        return dict((r[0], r[1]) for r in rows)

    assert cells(_diagnosis(draws=1))["missing rate 0.5"] == "70.00"
    assert cells(_diagnosis(draws=5))["missing rate 0.5"] == "70.00 ± 2.00"
