"""Peak resident memory (RSS) of the default ``equimodal train``.

Runs ``equimodal train`` (as in the README: no options, i.e. ``shapley_alternating`` on
mfeat with relative EDM, which also trains one unimodal model per modality) in a
subprocess with its run folder in a temporary directory, and reads the peak RSS of that
process from the operating system (``wait4``'s resource usage of the child). On a GPU the number is
host memory only. Target: under 1 GiB.

``--quick`` trains one epoch on a small synthetic dataset without relative EDM, so the
number is mostly the interpreter, torch and the libraries.

    python benchmarks/memory.py [--quick] [--device auto]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from common import emit, median, parser, print_table, setup

TARGET_GIB = 1.0


def peak_rss_gib(command: list[str], env: dict[str, str], log: str) -> tuple[float, float]:
    """Peak RSS (GiB) and wall time (s) of ``command`` run to completion.

    ``os.wait4`` gives the resource usage of that one child (and what it waited for), so
    repeated runs are measured separately. Its output goes to the file ``log``.
    """
    start = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        with open(log) as f:
            sys.stderr.write(f.read())
        raise SystemExit(f"equimodal train failed with exit code {proc.returncode}")
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return usage.ru_maxrss * scale / 2**30, wall


def main() -> None:
    """Run the default training once (or ``--reps`` times) and report its peak RSS."""
    args = parser(__doc__.splitlines()[0]).parse_args()
    device = setup(args)
    reps = args.reps or 1
    peaks, walls = [], []
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "equimodal", "train", "--quiet", "--out", out]
            command += ["--set", f"train.device={device.type}"]
            if args.quick:
                command += ["--dataset", "synthetic", "--epochs", "1"]
                command += ["--set", "train.relative_edm=false"]
                command += ["--set", "dataset.options={num_samples: 120}"]
            env = dict(os.environ)
            if args.threads is not None:
                env["OMP_NUM_THREADS"] = str(args.threads)
            elif args.quick:
                env["OMP_NUM_THREADS"] = "1"
            peak, wall = peak_rss_gib(command, env, os.path.join(out, "train.log"))
            peaks.append(peak)
            walls.append(wall)
    peak, wall = median(peaks), median(walls)
    print_table(
        f"Peak RSS of {'a one-epoch synthetic run (quick)' if args.quick else 'equimodal train'}"
        f" (target < {TARGET_GIB} GiB)",
        ["command", "runs", "peak RSS GiB", "wall s"],
        [["equimodal train" + (" (quick)" if args.quick else ""), reps, peak, wall]],
    )
    emit({"peak_rss_gib": peak, "peak_rss_over_target": peak / TARGET_GIB, "wall_s": wall})


if __name__ == "__main__":
    main()
