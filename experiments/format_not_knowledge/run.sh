#!/usr/bin/env bash
# The study's sweep, then its report into experiments/format_not_knowledge/results/ (experiments/run_study.sh).
#   bash experiments/format_not_knowledge/run.sh [extra overrides, e.g. model=tiny trainer=smoke]
exec bash "$(dirname "$0")/../run_study.sh" format_not_knowledge "$@"
