#!/usr/bin/env bash
# The study's sweep, then its report into experiments/forgetting_over_steps/results/ (experiments/run_study.sh).
#   bash experiments/forgetting_over_steps/run.sh [extra overrides, e.g. model=tiny trainer=smoke]
exec bash "$(dirname "$0")/../run_study.sh" forgetting_over_steps "$@"
