#!/usr/bin/env bash
# Where LoReFT's edit leaks: one factor at a time from the default LoReFT (rank 4, every layer,
# f3+l3) — positions, layers, rank — plus LoRA r8 as the reference, 3 seeds each, all into one sweep
# directory; then the report and verdict.md (is any configuration within 90% of the best task gain
# with leakage no worse than LoRA's?).
#   bash experiments/where_loreft_leaks/run.sh [extra overrides, e.g. model=tiny trainer=smoke]
# Writes the jobs under multirun/where_loreft_leaks/<date>/ (or $SWEEP) and the report and verdict
# under experiments/where_loreft_leaks/results/ (or $OUT). $LAUNCH: launcher overrides (default: two
# jobs at a time, one core each). $LAYERS: the layer spans (default early:4,middle:4,late:4; a
# model needs 12 layers for 4 in each third).
set -euo pipefail
cd "$(dirname "$0")/../.."
REFT_LAB=${REFT_LAB:-.venv/bin/reft-lab}
PYTHON=${PYTHON:-$(dirname "$REFT_LAB")/python}
SWEEP=${SWEEP:-multirun/where_loreft_leaks/$(date -u +%Y-%m-%d_%H-%M-%S)}
OUT=${OUT:-experiments/where_loreft_leaks/results}
read -r -a LAUNCH <<< "${LAUNCH:-hydra/launcher=joblib hydra.launcher.n_jobs=2}"
train() { "$REFT_LAB" train -m experiment=where_loreft_leaks "${LAUNCH[@]}" "hydra.sweep.dir=$SWEEP" "$@"; }
train method=loreft method.positions=f1,l1,f3+l3,f7+l7 "$@"  # f3+l3: the default LoReFT, every layer, rank 4
train method=loreft "method.layers=${LAYERS:-early:4,middle:4,late:4}" "$@"
train method=loreft method.rank=1,8 "$@"
train method=lora "$@"
mkdir -p "$OUT"
"$REFT_LAB" report "$SWEEP" --out "$OUT"
"$PYTHON" experiments/where_loreft_leaks/verdict.py "$SWEEP" "$OUT"
