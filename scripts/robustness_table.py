"""Robustness table of bench runs.

Usage: `python scripts/robustness_table.py results/readme joint shapley_alternating`.

For every run folder `<bench>/<dataset>/<label>-s<seed>` of the named labels, scores the
selected checkpoint on its test split under missing modalities and noise
(`equimodal evaluate RUN --robustness`, written to RUN/robustness/), then prints one
Markdown table: mean ± std over seeds per dataset and method.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from equimodal.engine.trainer import load_run
from equimodal.robustness import evaluate_robustness, write_robustness


def main(bench: str, labels: list[str]) -> None:
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    started = time.perf_counter()
    for label in labels:
        for run in sorted(Path(bench).glob(f"*/{label}-s*")):
            if not (run / "metrics.json").is_file():
                continue
            cached = run / "robustness" / "robustness.json"
            if not cached.is_file():
                cfg, model, strategy, data = load_run(run)
                result = evaluate_robustness(
                    model, data.test, strategy.inference_kwargs(), draws=5, seed=cfg.seed
                )
                write_robustness(result, run / "robustness")
            rows[(run.parent.name, label)].append(json.loads(cached.read_text()))
    print(f"<!-- {time.perf_counter() - started:.0f} s -->", file=sys.stderr)

    def cell(values: list[float]) -> str:
        return f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f}"

    etas = [r["eta"] for r in next(iter(rows.values()))[0]["missing"]]
    sigmas = [r["sigma"] for r in next(iter(rows.values()))[0]["noise"]]
    head = ["dataset", "method", "seeds", "all modalities", "strongest removed"]
    head += [f"missing {e:g}" for e in etas] + [f"noise σ {s:g}" for s in sigmas]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for (dataset, label), results in sorted(rows.items()):
        strongest = {r["strongest_removed"]["modality"] for r in results}
        line = [dataset, label, str(len(results)), cell([r["full"]["accuracy"] for r in results])]
        line.append(
            f"{cell([r['strongest_removed']['without'] for r in results])} "
            f"(without {'/'.join(sorted(strongest))})"
        )
        line += [cell([r["missing"][i]["accuracy"] for r in results]) for i in range(len(etas))]
        line += [cell([r["noise"][i]["accuracy"] for r in results]) for i in range(len(sigmas))]
        print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
