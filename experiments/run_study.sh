#!/usr/bin/env bash
# One study: its sweep (the Hydra experiment preset of the same name), then its report.
#   bash experiments/run_study.sh <study> [extra overrides, e.g. model=tiny trainer=smoke]
# Writes the jobs under multirun/<study>/<date>/ (or $SWEEP) and report.md, report.csv and the
# report's figures under experiments/<study>/results/ (or $OUT). $REFT_LAB: the CLI to use.
set -euo pipefail
cd "$(dirname "$0")/.."
STUDY=$1
shift
REFT_LAB=${REFT_LAB:-.venv/bin/reft-lab}
SWEEP=${SWEEP:-multirun/$STUDY/$(date -u +%Y-%m-%d_%H-%M-%S)}
OUT=${OUT:-experiments/$STUDY/results}
"$REFT_LAB" train -m "experiment=$STUDY" "hydra.sweep.dir=$SWEEP" "$@"
mkdir -p "$OUT"
"$REFT_LAB" report "$SWEEP" --out "$OUT"
