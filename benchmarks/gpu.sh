#!/usr/bin/env bash
# Every benchmark in benchmarks/ on a CUDA GPU, in one go, ending with one JSON line that
# combines every script's result.
#
#   bash benchmarks/gpu.sh            # from the repository root; about 4-7 minutes
#   bash benchmarks/gpu.sh --quick    # CI-sized inputs (seconds per script)
#   EQUIMODAL_BENCH_DEVICE=cpu bash benchmarks/gpu.sh --quick   # the same path on the CPU
#
# Python: .venv/bin/python when the repository has one, else `python` from PATH (override
# with EQUIMODAL_PYTHON). It stops at once, with exit code 2, when that Python's torch
# cannot reach CUDA. Every script runs under a time limit taken from a total budget
# (EQUIMODAL_BENCH_BUDGET_S, default 450 s), most important first; a script that fails or
# runs out of time is recorded in the JSON line ("failed") and the others still run.
# Each script's full output is kept in EQUIMODAL_BENCH_LOGS (default: a temporary folder,
# printed at the start). EQUIMODAL_BENCH_ONLY=name,name runs only those jobs (names below).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
QUICK=""
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK="--quick" ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $arg (only --quick)" >&2; exit 2 ;;
  esac
done

if [[ -n "${EQUIMODAL_PYTHON:-}" ]]; then
  PY="$EQUIMODAL_PYTHON"
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
elif command -v python >/dev/null 2>&1; then
  PY=python
else
  PY=python3
fi
# an absolute path: the scripts run from benchmarks/
if [[ "$PY" == */* && "$PY" != /* ]]; then
  PY="$PWD/$PY"
elif [[ "$PY" != /* ]]; then
  PY="$(command -v "$PY")" || { echo "gpu.sh: no python found" >&2; exit 2; }
fi
DEVICE="${EQUIMODAL_BENCH_DEVICE:-cuda}"
BUDGET="${EQUIMODAL_BENCH_BUDGET_S:-450}"
LOGS="${EQUIMODAL_BENCH_LOGS:-$(mktemp -d -t equimodal-bench-XXXXXX)}"
mkdir -p "$LOGS" || exit 2

if [[ "$DEVICE" == "cuda" ]]; then
  if ! "$PY" - <<'EOF'
import sys
try:
    import torch
except ImportError as err:
    sys.exit(f"gpu.sh: {sys.executable} cannot import torch ({err})")
if not torch.cuda.is_available():
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    sys.exit(
        f"gpu.sh: CUDA is not available to {sys.executable} (torch {torch.__version__}, {build}); "
        "run on a GPU machine with a CUDA build of torch, or set EQUIMODAL_BENCH_DEVICE=cpu"
    )
print(f"gpu.sh: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
  then
    exit 2
  fi
elif ! "$PY" -c "import equimodal, torch" 2>/dev/null; then
  echo "gpu.sh: $PY cannot import equimodal and torch" >&2
  exit 2
fi
echo "gpu.sh: python $PY, device $DEVICE, budget ${BUDGET}s, logs in $LOGS"

# name | per-script cap in seconds | command (run from benchmarks/)
if [[ -n "$QUICK" ]]; then
  JOBS=(
    "av_geometry_fp32|120|av_geometry.py --quick --precision fp32"
    "av_geometry_bf16|120|av_geometry.py --quick --precision bf16"
    "alternating_cost|120|alternating_cost.py --quick"
    "shapley_overhead|120|shapley_overhead.py --quick"
    "hybrid_order|120|hybrid_order.py --quick"
    "loader_workers|120|loader_workers.py --quick --workers 0,2"
    "memory|120|memory.py --quick"
    "dataset_fixtures|180|dataset_fixtures.py --quick"
  )
else
  JOBS=(
    # the CREMA-D epoch measured step by step (ceil(6028/64) steps per method, the whole
    # validation split encoded), fp32 and bf16; Kinetics-Sounds from 10 steps
    "av_geometry_fp32|100|av_geometry.py --datasets cremad --epoch --precision fp32"
    "av_geometry_bf16|100|av_geometry.py --datasets cremad --epoch --precision bf16"
    "av_geometry_ks_fp32|60|av_geometry.py --datasets kinetics_sounds --reps 10 --precision fp32"
    "alternating_cost|50|alternating_cost.py --reps 3"
    "shapley_overhead|90|shapley_overhead.py --reps 3"
    "hybrid_order|40|hybrid_order.py --reps 10"
    "loader_workers|40|loader_workers.py --workers 0,2,4,8"
    "memory|60|memory.py"
    "dataset_fixtures|90|dataset_fixtures.py"
  )
fi

START=$SECONDS
RESULTS="$LOGS/results.tsv"
: > "$RESULTS"
for job in "${JOBS[@]}"; do
  IFS="|" read -r name cap command <<< "$job"
  if [[ -n "${EQUIMODAL_BENCH_ONLY:-}" && ",$EQUIMODAL_BENCH_ONLY," != *",$name,"* ]]; then
    continue
  fi
  left=$(( BUDGET - (SECONDS - START) ))
  if (( left < 10 )); then
    echo "gpu.sh: $name skipped (budget spent)"
    printf '%s\tskipped\t0\n' "$name" >> "$RESULTS"
    continue
  fi
  limit=$(( cap < left ? cap : left ))
  echo "gpu.sh: $name (limit ${limit}s): $command"
  began=$SECONDS
  # shellcheck disable=SC2086
  (cd benchmarks && exec timeout --kill-after=10 "$limit" "$PY" $command --device "$DEVICE") \
    > "$LOGS/$name.log" 2>&1
  code=$?
  took=$(( SECONDS - began ))
  if (( code == 0 )) && tail -n 1 "$LOGS/$name.log" | grep -q '^{'; then
    printf '%s\tok\t%s\n' "$name" "$took" >> "$RESULTS"
    # the readable part: everything but the JSON line and library warnings
    sed '$d' "$LOGS/$name.log" | grep -v -E 'Warning|warnings.warn' || true
  else
    why="exit code $code"
    (( code == 124 || code == 137 )) && why="timed out"
    printf '%s\tfailed (%s)\t%s\n' "$name" "$why" "$took" >> "$RESULTS"
    echo "gpu.sh: $name failed ($why) after ${took}s; last lines of $LOGS/$name.log:"
    tail -n 5 "$LOGS/$name.log" | sed 's/^/    /'
  fi
done

"$PY" - "$LOGS" "$DEVICE" "$(( SECONDS - START ))" "$QUICK" <<'EOF'
import json
import sys
from pathlib import Path

logs, device, wall, quick = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
combined = {"device": device, "quick": bool(quick), "wall_s": wall, "failed": {}}
for line in (logs / "results.tsv").read_text().splitlines():
    name, status, took = line.split("\t")
    if status != "ok":
        combined["failed"][name] = f"{status} after {took} s"
        continue
    last = (logs / f"{name}.log").read_text().strip().splitlines()[-1]
    combined[name] = {**json.loads(last), "wall_s": int(took)}
print(json.dumps(combined), flush=True)
EOF
