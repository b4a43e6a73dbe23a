#!/usr/bin/env bash
# Reproduces the README results table: 2 datasets x 2 methods x 5 seeds, then the summary.
# Usage: bash scripts/core_results.sh [OUT_DIR]   (about 15 minutes on 2 CPU cores)
set -euo pipefail
out=${1:-runs/core}
for config in configs/mfeat_shapley_alternating.yaml configs/mfeat_joint.yaml \
              configs/htad_shapley_alternating.yaml configs/htad_joint.yaml; do
  for seed in 0 1 2 3 4; do
    name=$(basename "$config" .yaml)-s$seed
    [ -f "$out/$name/metrics.json" ] && continue   # finished runs are not repeated
    rm -rf "${out:?}/$name"
    equimodal train --config "$config" --seed "$seed" --name "$name" --out "$out" --quiet
  done
done
equimodal report "$out" --out "$out/summary.md"
equimodal report "$out" --out "$out/summary.csv"
