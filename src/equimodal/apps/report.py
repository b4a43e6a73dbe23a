"""Tables and plots from run folders.

* :func:`summarize` groups finished runs by (dataset, strategy, fusion) and gives mean and
  standard deviation over seeds of test accuracy, macro-F1, EDM, each modality's Shapley
  share and training time; :func:`summary_markdown` / :func:`summary_csv` format it.
* :func:`plot_run` draws a run's learning curves, Shapley share per modality per epoch
  and EDM per epoch from ``history.jsonl``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from equimodal.apps.stats import Comparison, compare_to_reference
from equimodal.core.files import save_figure


def find_runs(root: str | Path) -> list[Path]:
    """Run folders under ``root`` (itself included) that hold a ``metrics.json``."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"folder {str(root)!r} does not exist")
    tuning = root / "tuning"  # a bench's tuning runs (no test scores) are not results
    return sorted(p.parent for p in root.rglob("metrics.json") if tuning not in p.parents)


def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The ``metrics.json`` of a run folder."""
    path = Path(run_dir) / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {str(path)!r}: {err}") from None
    robustness = Path(run_dir) / "robustness" / "robustness.json"
    if robustness.is_file():  # written by `equimodal evaluate --robustness` or the bench
        # an unreadable robustness file only loses its columns
        with contextlib.suppress(OSError, json.JSONDecodeError):
            metrics["robustness"] = json.loads(robustness.read_text(encoding="utf-8"))
    return metrics


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return float(arr.mean()), std


def summarize(
    metrics: list[dict[str, Any]],
    by_run_name: bool = False,
    comparisons: dict[tuple[str, str], Comparison] | None = None,
) -> list[dict[str, Any]]:
    """One row per (dataset, method): mean and std over seeds of the test scores.

    A method is (strategy, fusion), or the run name when ``by_run_name`` (bench labels);
    ``comparisons`` maps (dataset, method) to its paired comparison with a reference
    (:func:`equimodal.apps.stats.compare_to_reference`, Holm-corrected).
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for m in metrics:
        label = m["run"] if by_run_name else f"{m['strategy']} ({m.get('fusion')})"
        groups[(m["dataset"], label)].append(m)
    rows = []
    for (dataset, label), runs in sorted(groups.items()):
        runs = sorted(runs, key=lambda r: r["seed"])
        row: dict[str, Any] = {
            "dataset": dataset,
            "method": label,
            "strategy": runs[0]["strategy"],
            "fusion": str(runs[0].get("fusion")),
            "seeds": [r["seed"] for r in runs],
            "comparison": (comparisons or {}).get((dataset, label)),
        }
        for key in ("accuracy", "macro_f1", "edm", "relative_edm"):
            row[key] = _mean_std([r["test"][key] for r in runs if key in r["test"]] or [math.nan])
        row["train_time_s"] = _mean_std([r["train_time_s"] for r in runs])
        robust = [r["robustness"] for r in runs if "robustness" in r]
        if robust and len(robust) == len(runs) and all("strongest_removed" in x for x in robust):
            row["missing_0.5"] = _mean_std(
                [next(m["accuracy"] for m in x["missing"] if m["eta"] == 0.5) for x in robust]
                if all(any(m["eta"] == 0.5 for m in x["missing"]) for x in robust)
                else [math.nan]
            )
            row["strongest_removed"] = _mean_std(
                [x["strongest_removed"]["without"] for x in robust]
            )
        names = runs[0]["modalities"]
        row["share"] = {n: _mean_std([r["test"]["shapley_share"][n] for r in runs]) for n in names}
        rows.append(row)
    return rows


def mean_std_text(
    pair: tuple[float, float], digits: int = 2, seeds: int = 2, scale: float = 100.0
) -> str:
    """``mean ± std`` of a summary cell (percentages by default, ``-`` when missing); from
    fewer than two ``seeds`` just the mean, since one value has no spread to show."""
    mean, std = pair
    if math.isnan(mean):
        return "-"
    if seeds < 2:
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def difference_text(c: Comparison | None) -> tuple[str, str]:
    """``+1.23 [+0.10, +2.36]`` points and the Holm p-value (``*``: survives)."""
    if c is None:
        return "-", "-"
    diff = f"{100 * c.diff:+.2f} [{100 * c.ci_low:+.2f}, {100 * c.ci_high:+.2f}]"
    return diff, f"{c.p_holm:.3f}" + (" *" if c.survives() else "")


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table (percentages; Shapley shares per modality; ``mean ±
    std`` over seeds, just the mean for a method with one seed).

    With comparisons: the paired difference of test accuracy against the reference in
    points with its 95 % confidence interval, and the Holm-adjusted p-value (``*``: the
    difference survives the correction at 0.05).
    """
    robust = any("missing_0.5" in r for r in rows)
    extra_head = " missing 0.5 % | strongest removed % |" if robust else ""
    lines = [
        "| dataset | method | seeds | test accuracy % | macro-F1 % | EDM % "
        "| relative EDM % | Shapley share per modality % | train time s "
        "| Δ accuracy vs reference, pts [95% CI] | p (Holm) |" + extra_head,
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if robust else ""),
    ]
    for r in rows:
        shares = ", ".join(f"{n} {100 * v[0]:.0f}" for n, v in r["share"].items())
        diff_text, p_text = difference_text(r.get("comparison"))
        n = len(r["seeds"])
        lines.append(
            f"| {r['dataset']} | {r['method']} | {n} "
            f"| {mean_std_text(r['accuracy'], 2, n)} | {mean_std_text(r['macro_f1'], 2, n)} "
            f"| {mean_std_text(r['edm'], 1, n)} | {mean_std_text(r['relative_edm'], 1, n)} "
            f"| {shares} | {mean_std_text(r['train_time_s'], 1, n, scale=1.0)} "
            f"| {diff_text} | {p_text} |"
            + (
                f" {mean_std_text(r.get('missing_0.5', (math.nan, 0.0)), 2, n)} "
                f"| {mean_std_text(r.get('strongest_removed', (math.nan, 0.0)), 2, n)} |"
                if robust
                else ""
            )
        )
    return "\n".join(lines) + "\n"


def tuning_markdown(root: Path) -> list[str]:
    """The ``tuning.json`` of a bench as report lines: each method's trials (mean
    validation accuracy over the tuning seeds) and the chosen one (empty without tuning)."""
    path = root / "tuning.json"
    if not path.is_file():
        return []
    record = json.loads(path.read_text(encoding="utf-8"))
    lines = [
        "## Tuning (chosen on validation only)\n",
        "Every method had the same number of trials; each trial trained on the tuning seeds "
        "without ever scoring test, and the trial with the best mean validation accuracy was "
        "run on the evaluation seeds.\n",
        "| dataset | method | trial | settings | mean val accuracy % | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for dataset, methods in sorted(record.items()):
        for label, entry in sorted(methods.items()):
            for k, trial in enumerate(entry["trials"]):
                settings = ", ".join(f"{a}={b}" for a, b in trial["settings"].items()) or "-"
                mean = trial["mean_val_accuracy"]
                score = "-" if mean is None else f"{100 * mean:.2f}"
                mark = "yes" if entry["chosen"] == k else ""
                lines.append(f"| {dataset} | {label} | {k} | {settings} | {score} | {mark} |")
    return [*lines, ""]


def comparison_note(reference: str) -> str:
    """The sentence under a table with comparisons: what the columns mean."""
    return (
        f"Δ: mean paired difference of test accuracy against {reference!r} over common seeds "
        "(95 % t confidence interval); p: paired t-test, Holm-corrected over every comparison "
        "of the table; * marks a difference that survives the correction at 0.05."
    )


def summary_csv(rows: list[dict[str, Any]]) -> str:
    """The summary as CSV (fractions, not percentages)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    share_names = sorted({n for r in rows for n in r["share"]})
    header = ["dataset", "method", "strategy", "fusion", "n_seeds"]
    extra = [k for k in ("missing_0.5", "strongest_removed") if any(k in r for r in rows)]
    for key in ("accuracy", "macro_f1", "edm", "relative_edm", "train_time_s", *extra):
        header += [f"{key}_mean", f"{key}_std"]
    header += [f"share_{n}_mean" for n in share_names]
    header += ["diff_vs_reference", "diff_ci_low", "diff_ci_high", "p_value", "p_holm", "survives"]
    writer.writerow(header)
    for r in rows:
        line = [r["dataset"], r["method"], r["strategy"], r["fusion"], len(r["seeds"])]
        for key in ("accuracy", "macro_f1", "edm", "relative_edm", "train_time_s"):
            line += list(r[key])
        for key in extra:
            line += list(r.get(key, ("", "")))
        line += [r["share"][n][0] if n in r["share"] else "" for n in share_names]
        c = r.get("comparison")
        if c is None:
            line += [""] * 6
        else:
            line += [c.diff, c.ci_low, c.ci_high, c.p, c.p_holm, c.survives()]
        writer.writerow(line)
    return buf.getvalue()


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of a run's ``history.jsonl``."""
    path = Path(run_dir) / "history.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def integer_epochs(*axes: Any) -> None:
    """Tick the x axis (epochs) of each matplotlib axes at whole numbers only: a run of
    three epochs gets 1, 2, 3, not 1.0, 1.25, 1.5."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw ``curves.png`` (loss, validation accuracy), ``shapley.png`` (share per modality
    per epoch) and ``edm.png`` into ``out_dir`` (default: the run folder); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = read_history(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    epochs = [h["epoch"] for h in history]
    paths = []

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    train_rows = [h for h in history if "train" in h]
    ax[0].plot(
        [h["epoch"] for h in train_rows], [h["train"].get("loss", np.nan) for h in train_rows]
    )
    ax[0].set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax[1].plot(epochs, [100 * h["val"]["accuracy"] for h in history], label="accuracy")
    ax[1].plot(epochs, [100 * h["val"]["macro_f1"] for h in history], label="macro-F1")
    ax[1].set(xlabel="epoch", ylabel="%", title="validation")
    ax[1].legend()
    integer_epochs(*ax)
    fig.tight_layout()
    paths.append(out / "curves.png")
    save_figure(fig, paths[-1], dpi=110)
    plt.close(fig)

    if "shapley_share" in history[0]["val"]:
        names = list(history[0]["val"]["shapley_share"])
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for n in names:
            ax.plot(epochs, [100 * h["val"]["shapley_share"][n] for h in history], label=n)
        ax.axhline(100 / len(names), color="gray", ls="--", lw=1, label="equal share")
        ax.set(
            xlabel="epoch",
            ylabel="share of contribution %",
            title="Shapley share per modality (val)",
        )
        ax.legend(fontsize=8, ncol=2)
        integer_epochs(ax)
        fig.tight_layout()
        paths.append(out / "shapley.png")
        save_figure(fig, paths[-1], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(epochs, [100 * h["val"]["edm"] for h in history])
        ax.set(
            xlabel="epoch", ylabel="EDM %", title="Equilibrium deviation (val; 0 = equal shares)"
        )
        integer_epochs(ax)
        fig.tight_layout()
        paths.append(out / "edm.png")
        save_figure(fig, paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _method_label(metrics: dict[str, Any], by_run_name: bool) -> str:
    return metrics["run"] if by_run_name else f"{metrics['strategy']} ({metrics.get('fusion')})"


def _mean_curve(histories: list[list[dict[str, Any]]], read) -> tuple[list[int], list[float]]:
    """Mean over runs of ``read(row)`` per epoch (each epoch over the runs that reached it)."""
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for history in histories:
        for row in history:
            value = read(row)
            if value is not None:
                per_epoch[row["epoch"]].append(value)
    epochs = sorted(per_epoch)
    return epochs, [float(np.mean(per_epoch[e])) for e in epochs]


def plot_comparison(
    run_dirs: list[Path], out_dir: str | Path, by_run_name: bool = False
) -> list[Path]:
    """Per dataset: accuracy versus EDM across methods, and each method's Shapley share
    per modality and EDM per epoch (validation, mean over seeds). Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grouped: dict[str, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    metrics = {r: load_metrics(r) for r in run_dirs}
    for r, m in metrics.items():
        grouped[m["dataset"]][_method_label(m, by_run_name)].append(r)
    paths = []
    for dataset, methods in sorted(grouped.items()):
        # accuracy versus EDM: one point per method, error bars over seeds
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for label, runs in sorted(methods.items()):
            acc = [100 * metrics[r]["test"]["accuracy"] for r in runs]
            dev = [100 * metrics[r]["test"]["edm"] for r in runs if "edm" in metrics[r]["test"]]
            if not dev:
                continue
            ax.errorbar(
                np.mean(dev),
                np.mean(acc),
                xerr=np.std(dev, ddof=1) if len(dev) > 1 else 0,
                yerr=np.std(acc, ddof=1) if len(acc) > 1 else 0,
                fmt="o",
                capsize=3,
                label=f"{label} (n={len(runs)})",
            )
        ax.set(
            xlabel="EDM % (test; lower = more balanced)",
            ylabel="test accuracy %",
            title=f"{dataset}: accuracy versus balance",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        paths.append(out / f"{dataset}_accuracy_vs_edm.png")
        save_figure(fig, paths[-1], dpi=110)
        plt.close(fig)

        # per method: Shapley share per modality per epoch (top), EDM per epoch (bottom)
        labels = sorted(methods)
        histories = {label: [read_history(r) for r in methods[label]] for label in labels}
        names = metrics[methods[labels[0]][0]]["modalities"]
        cols = len(labels)
        fig, axes = plt.subplots(
            2, cols, figsize=(2.6 * cols + 1, 5.2), sharey="row", squeeze=False
        )
        for j, label in enumerate(labels):
            top, bottom = axes[0][j], axes[1][j]
            for n in names:
                epochs, share = _mean_curve(
                    histories[label],
                    lambda row, n=n: (
                        100 * row["val"]["shapley_share"][n]
                        if "shapley_share" in row.get("val", {})
                        else None
                    ),
                )
                top.plot(epochs, share, label=n, lw=1.2)
            top.axhline(100 / len(names), color="gray", ls="--", lw=0.8)
            top.set_title(label, fontsize=8)
            epochs, dev = _mean_curve(
                histories[label],
                lambda row: 100 * row["val"]["edm"] if "edm" in row.get("val", {}) else None,
            )
            bottom.plot(epochs, dev, color="black", lw=1.2)
            bottom.set_xlabel("epoch")
            integer_epochs(top, bottom)
        axes[0][0].set_ylabel("Shapley share % (val)")
        axes[1][0].set_ylabel("EDM % (val)")
        axes[0][-1].legend(fontsize=7, loc="upper right")
        fig.suptitle(f"{dataset}: per-epoch balance, mean over seeds", fontsize=10)
        fig.tight_layout()
        paths.append(out / f"{dataset}_balance_per_epoch.png")
        save_figure(fig, paths[-1], dpi=110)
        plt.close(fig)
    return paths


def is_bench_dir(path: str | Path) -> bool:
    """A folder written by ``equimodal bench`` (it keeps a copy of its bench file)."""
    return (Path(path) / "bench.yaml").is_file()


def write_report(
    path: str | Path,
    comparisons: dict[tuple[str, str], Comparison] | None = None,
    reference: str | None = None,
) -> Path:
    """Render ``report.md`` (summary table and plots under ``figures/``) for a run folder,
    a folder of runs, or a bench folder; returns the report's path."""
    from equimodal.core.files import write_text_atomic

    root = Path(path)
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no finished run (metrics.json) under {str(root)!r}")
    by_run_name = is_bench_dir(root)
    metrics = [load_metrics(r) for r in runs]
    if by_run_name and comparisons is None:
        import yaml

        reference = (yaml.safe_load((root / "bench.yaml").read_text()) or {}).get("reference")
        comparisons = compare_to_reference(metrics, reference) if reference else None
    rows = summarize(metrics, by_run_name=by_run_name, comparisons=comparisons)
    figures = root / "figures"
    lines = [f"# equimodal report: {root.name or root}", ""]
    spread = (
        "mean ± std over seeds"
        if any(len(r["seeds"]) > 1 for r in rows)
        else "one seed per method, so no standard deviation"
    )
    lines += [
        f"{len(runs)} finished runs; test scores, {spread}. Every run selected "
        "its checkpoint on validation and read test once.",
        "",
        summary_markdown(rows),
    ]
    if reference:
        lines.append(comparison_note(reference) + "\n")
    if len(runs) == 1:
        images = plot_run(runs[0], figures)
    else:
        images = plot_comparison(runs, figures, by_run_name=by_run_name)
    lines += tuning_markdown(root)
    lines.append("## Figures\n")
    for image in images:
        rel = image.relative_to(root)
        lines.append(f"![{image.stem}]({rel.as_posix()})\n")
    report_path = root / "report.md"
    write_text_atomic(report_path, "\n".join(lines))
    return report_path
