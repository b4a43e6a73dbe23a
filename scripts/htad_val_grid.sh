#!/usr/bin/env bash
# A small encoder grid on HTAD for both methods, 5 seeds each; choose by mean VALIDATION
# accuracy (scripts/val_select.py), never by test.
set -euo pipefail
out=${1:-runs/htad_grid}
for st in shapley_alternating joint; do
  for dropout in 0.1 0.3; do
    for depth in 1 2; do
      for seed in 0 1 2 3 4; do
        name=${st}-do${dropout}-d${depth}-s${seed}
        [ -f "$out/$name/metrics.json" ] && continue
        rm -rf "${out:?}/$name"
        equimodal train --config configs/htad_${st}.yaml --seed $seed --name $name --out $out -q \
          --set model.encoder.dropout=$dropout --set model.encoder.depth=$depth > /dev/null
      done
    done
  done
done
