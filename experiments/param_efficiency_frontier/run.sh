#!/usr/bin/env bash
# The parameter-efficiency frontier: 15 method configurations × json_answer, arithmetic × 3 seeds,
# two jobs at a time on one core each, then the report (frontier.png) and the LoReFT-to-LoRA ratio.
#   bash experiments/param_efficiency_frontier/run.sh [extra overrides, e.g. model=tiny trainer=smoke]
# Writes the jobs under multirun/param_efficiency_frontier/<date>/ (or $SWEEP) and the report and
# ratio.md under experiments/param_efficiency_frontier/results/ (or $OUT).
set -euo pipefail
cd "$(dirname "$0")/../.."
REFT_LAB=${REFT_LAB:-.venv/bin/reft-lab}
PYTHON=${PYTHON:-$(dirname "$REFT_LAB")/python}
SWEEP=${SWEEP:-multirun/param_efficiency_frontier/$(date -u +%Y-%m-%d_%H-%M-%S)}
OUT=${OUT:-experiments/param_efficiency_frontier/results}
"$REFT_LAB" train -m experiment=param_efficiency_frontier hydra/launcher=joblib hydra.launcher.n_jobs=2 \
  "hydra.sweep.dir=$SWEEP" "$@"
mkdir -p "$OUT"
"$REFT_LAB" report "$SWEEP" --out "$OUT"
"$PYTHON" experiments/param_efficiency_frontier/ratio.py "$SWEEP" "$OUT"
