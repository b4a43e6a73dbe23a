"""Tables and plots from run folders.

* :func:`summarize` groups finished runs by (dataset, strategy, fusion) and gives mean and
  standard deviation over seeds of test accuracy, macro-F1, EDM, each modality's Shapley
  share and training time; :func:`summary_markdown` / :func:`summary_csv` format it.
* :func:`plot_run` draws a run's learning curves, Shapley share per modality per epoch
  and EDM per epoch from ``history.jsonl``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def find_runs(root: str | Path) -> list[Path]:
    """Run folders under ``root`` (itself included) that hold a ``metrics.json``."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"folder {str(root)!r} does not exist")
    return sorted(p.parent for p in root.rglob("metrics.json"))


def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The ``metrics.json`` of a run folder."""
    path = Path(run_dir) / "metrics.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {str(path)!r}: {err}") from None


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return float(arr.mean()), std


def summarize(
    metrics: list[dict[str, Any]],
    by_run_name: bool = False,
    p_values: dict[tuple[str, str], float] | None = None,
) -> list[dict[str, Any]]:
    """One row per (dataset, method): mean and std over seeds of the test scores.

    A method is (strategy, fusion), or the run name when ``by_run_name`` (bench labels);
    ``p_values`` maps (dataset, method) to a paired test's p-value against a reference.
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
            "p_value": (p_values or {}).get((dataset, label)),
        }
        for key in ("accuracy", "macro_f1", "edm", "relative_edm"):
            row[key] = _mean_std([r["test"][key] for r in runs if key in r["test"]] or [math.nan])
        row["train_time_s"] = _mean_std([r["train_time_s"] for r in runs])
        names = runs[0]["modalities"]
        row["share"] = {n: _mean_std([r["test"]["shapley_share"][n] for r in runs]) for n in names}
        rows.append(row)
    return rows


def _pct(pair: tuple[float, float], digits: int = 2) -> str:
    mean, std = pair
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.{digits}f} ± {100 * std:.{digits}f}"


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table (percentages; Shapley shares per modality)."""
    lines = [
        "| dataset | method | seeds | test accuracy % | macro-F1 % | EDM % "
        "| relative EDM % | Shapley share per modality % | train time s | p (paired) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shares = ", ".join(f"{n} {100 * v[0]:.0f}" for n, v in r["share"].items())
        t_mean, t_std = r["train_time_s"]
        p_text = "-" if r["p_value"] is None else f"{r['p_value']:.3f}"
        lines.append(
            f"| {r['dataset']} | {r['method']} | {len(r['seeds'])} "
            f"| {_pct(r['accuracy'])} | {_pct(r['macro_f1'])} | {_pct(r['edm'], 1)} "
            f"| {_pct(r['relative_edm'], 1)} | {shares} | {t_mean:.1f} ± {t_std:.1f} | {p_text} |"
        )
    return "\n".join(lines) + "\n"


def summary_csv(rows: list[dict[str, Any]]) -> str:
    """The summary as CSV (fractions, not percentages)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    share_names = sorted({n for r in rows for n in r["share"]})
    header = ["dataset", "method", "strategy", "fusion", "n_seeds"]
    for key in ("accuracy", "macro_f1", "edm", "relative_edm", "train_time_s"):
        header += [f"{key}_mean", f"{key}_std"]
    header += [f"share_{n}_mean" for n in share_names] + ["p_value"]
    writer.writerow(header)
    for r in rows:
        line = [r["dataset"], r["method"], r["strategy"], r["fusion"], len(r["seeds"])]
        for key in ("accuracy", "macro_f1", "edm", "relative_edm", "train_time_s"):
            line += list(r[key])
        line += [r["share"][n][0] if n in r["share"] else "" for n in share_names]
        line.append("" if r["p_value"] is None else r["p_value"])
        writer.writerow(line)
    return buf.getvalue()


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of a run's ``history.jsonl``."""
    path = Path(run_dir) / "history.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


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
    fig.tight_layout()
    paths.append(out / "curves.png")
    fig.savefig(paths[-1], dpi=110)
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
        fig.tight_layout()
        paths.append(out / "shapley.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(epochs, [100 * h["val"]["edm"] for h in history])
        ax.set(
            xlabel="epoch", ylabel="EDM %", title="Equilibrium deviation (val; 0 = equal shares)"
        )
        fig.tight_layout()
        paths.append(out / "edm.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
