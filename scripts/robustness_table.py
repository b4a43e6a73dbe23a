"""Full robustness table of bench runs, from the files the bench already wrote.

Usage: `python scripts/robustness_table.py results/readme joint shapley_alternating`.

A bench file with `robustness: true` makes `equimodal bench` score every finished run under
missing modalities and noise (`RUN/robustness/robustness.json`, as `equimodal evaluate RUN
--robustness`), and its summary keeps two of those numbers per method: missing rate 0.5
and strongest modality removed. This script prints all of them for the named labels, one
Markdown row per dataset and method (mean ± std over seeds): every modality present, the
strongest removed (and which modality that was), each missing rate and each noise level.
It reads the JSON files only, so it needs neither checkpoints nor training.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def load(bench: str, labels: list[str]) -> dict[tuple[str, str], list[dict]]:
    """The robustness results of ``<bench>/<dataset>/<label>-s<seed>``, per (dataset, label)."""
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for label in labels:
        for run in sorted(Path(bench).glob(f"*/{label}-s*")):
            if not (run / "metrics.json").is_file():
                continue
            path = run / "robustness" / "robustness.json"
            if not path.is_file():
                sys.exit(
                    f"{path} is missing: run the bench with `robustness: true` in its bench file "
                    f"(or `equimodal evaluate {run} --robustness`)"
                )
            rows[(run.parent.name, label)].append(json.loads(path.read_text(encoding="utf-8")))
    if not rows:
        sys.exit(f"no finished run of {', '.join(labels)} under {bench}")
    return rows


def table(rows: dict[tuple[str, str], list[dict]]) -> str:
    """The Markdown table: mean ± std over seeds per dataset and method."""

    def cell(values: list[float]) -> str:
        return f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f}"

    first = next(iter(rows.values()))[0]
    etas = [r["eta"] for r in first["missing"]]
    sigmas = [r["sigma"] for r in first["noise"]]
    head = ["dataset", "method", "seeds", "all modalities", "strongest removed"]
    head += [f"missing {e:g}" for e in etas] + [f"noise σ {s:g}" for s in sigmas]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (dataset, label), results in sorted(rows.items()):
        strongest = {r["strongest_removed"]["modality"] for r in results}
        line = [dataset, label, str(len(results)), cell([r["full"]["accuracy"] for r in results])]
        line.append(
            f"{cell([r['strongest_removed']['without'] for r in results])} "
            f"(without {'/'.join(sorted(strongest))})"
        )
        line += [cell([r["missing"][i]["accuracy"] for r in results]) for i in range(len(etas))]
        line += [cell([r["noise"][i]["accuracy"] for r in results]) for i in range(len(sigmas))]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print(table(load(sys.argv[1], sys.argv[2:])))
