#!/usr/bin/env bash
# New knowledge and hallucination: the base model answers the knowledge probe; its known/unknown
# split is stored (results/known_split.json); LoRA, full and LoReFT train on unknown facts and on
# known ones (3 seeds), two jobs at a time on one core each, then the report.
#   bash experiments/new_knowledge/run.sh [extra overrides, e.g. model=tiny trainer=smoke]
# Writes the jobs under multirun/new_knowledge/<date>/ (or $SWEEP), the split to $OUT/known_split.json
# and the report under experiments/new_knowledge/results/ (or $OUT). $HEAD: probe questions kept for
# retention (default 100; the tasks use the rest). $SPLIT: an existing split file to use instead of
# computing one.
set -euo pipefail
cd "$(dirname "$0")/../.."
REFT_LAB=${REFT_LAB:-.venv/bin/reft-lab}
SWEEP=${SWEEP:-multirun/new_knowledge/$(date -u +%Y-%m-%d_%H-%M-%S)}
OUT=${OUT:-experiments/new_knowledge/results}
HEAD=${HEAD:-100}
if [ -z "${SPLIT:-}" ]; then
  SPLIT=$(realpath -m "$OUT/known_split.json")
  "$REFT_LAB" analyze known-split --out "$SPLIT" --head "$HEAD" experiment=new_knowledge "$@"
fi
"$REFT_LAB" train -m experiment=new_knowledge hydra/launcher=joblib hydra.launcher.n_jobs=2 "task.path=$SPLIT" "retention.knowledge_probe=$HEAD" "hydra.sweep.dir=$SWEEP" "$@"
mkdir -p "$OUT"
"$REFT_LAB" report "$SWEEP" --out "$OUT"
