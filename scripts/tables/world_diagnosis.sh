#!/usr/bin/env bash
# World diagnosis (issue 16 section 5): LAMP one change at a time (schedule, +LA, text selection, LBO sign, gamma0,
# beta) next to the benchmark's LAMP and CoOp+LA runs (same folders), WorldShapes, imb 10, seeds 1-3, tiny-world
# CLIP (configs/tables/world_diagnosis.yaml).
# Generates the world data and pretrains (or reuses) tiny-world, then plans the runs, runs what is missing
# (submitit; default 2 at a time, one torch thread each), collects and renders; --dry-run and --collect-only
# do neither of the first two (a dry run writes nothing and runs nothing).
# usage: bash scripts/tables/world_diagnosis.sh [--dry-run | --collect-only] [--jobs N] [--output DIR] [--data DIR]
#        [--launcher slurm --partition P --gpus-per-run G --time MIN]
# Tables: $OUTPUT/tables/world_diagnosis/ (default output/). All options: python -m tools.tables --help
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_world.sh"
world_table world_diagnosis "$@"
