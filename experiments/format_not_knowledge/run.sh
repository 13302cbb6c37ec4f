#!/usr/bin/env bash
# The "format, not knowledge" study: the sweep, then the report into this folder.
#   bash experiments/format_not_knowledge/run.sh [extra overrides, e.g. model=tiny trainer=smoke]
# Writes the jobs under multirun/format_not_knowledge/<date>/ and report.md, report.csv,
# pareto.png and scores.png under experiments/format_not_knowledge/results/ (or $OUT).
set -euo pipefail
cd "$(dirname "$0")/../.."
REFT_LAB=${REFT_LAB:-.venv/bin/reft-lab}
SWEEP=${SWEEP:-multirun/format_not_knowledge/$(date -u +%Y-%m-%d_%H-%M-%S)}
OUT=${OUT:-experiments/format_not_knowledge/results}
"$REFT_LAB" train -m experiment=format_not_knowledge "hydra.sweep.dir=$SWEEP" "$@"
mkdir -p "$OUT"
"$REFT_LAB" report "$SWEEP" --out "$OUT"
