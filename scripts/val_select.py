"""Group runs by name without the seed suffix; print mean validation and test accuracy.

Selection reads the validation column only; test is shown for the chosen row afterwards.
Usage: python scripts/val_select.py RUNS_DIR
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

groups = defaultdict(list)
for path in Path(sys.argv[1]).glob("*/metrics.json"):
    m = json.loads(path.read_text())
    groups[path.parent.name.rsplit("-s", 1)[0]].append(m)
print(f"{'config':40s} n  val%          test%")
for name, runs in sorted(groups.items()):
    val = np.array([r["val"]["accuracy"] for r in runs]) * 100
    test = np.array([r["test"]["accuracy"] for r in runs]) * 100
    v = f"{val.mean():6.2f}±{val.std(ddof=1):4.2f}"
    t = f"{test.mean():6.2f}±{test.std(ddof=1):4.2f}"
    print(f"{name:40s} {len(runs)}  {v}  {t}")
