#!/usr/bin/env bash
# The intruder-dimensions study: LoRA r8 and r64 at alpha = r and 2r, rsLoRA r64, full fine-tuning
# (3 seeds each, two jobs at a time on one core each), then `reft-lab analyze intruders` on every
# job (q_proj and v_proj, the matrices every variant updates; intruders' singular values scaled by
# $SCALE, default 0.3), then the report.
#   bash experiments/intruder_dimensions/run.sh [extra overrides, e.g. model=tiny trainer=smoke]
# Writes the jobs under multirun/intruder_dimensions/<date>/ (or $SWEEP) and the report under
# experiments/intruder_dimensions/results/ (or $OUT).
set -euo pipefail
cd "$(dirname "$0")/../.."
REFT_LAB=${REFT_LAB:-.venv/bin/reft-lab}
SWEEP=${SWEEP:-multirun/intruder_dimensions/$(date -u +%Y-%m-%d_%H-%M-%S)}
OUT=${OUT:-experiments/intruder_dimensions/results}
"$REFT_LAB" train -m experiment=intruder_dimensions hydra/launcher=joblib hydra.launcher.n_jobs=2 "hydra.sweep.dir=$SWEEP" "$@"
"$REFT_LAB" analyze intruders "$SWEEP"/*/ --modules q_proj v_proj --scale "${SCALE:-0.3}"
mkdir -p "$OUT"
"$REFT_LAB" report "$SWEEP" --out "$OUT"
