#!/usr/bin/env bash
# World ablation: Table 6's LAMP components (full, w/o MPP, w/o MSP, w/o LBO) + zero-shot CLIP on the three
# generated world datasets, imb 10, seeds 1-3, tiny-world CLIP (configs/tables/world_ablation.yaml; LAMP full = the
# benchmark's LAMP runs).
# Generates the world data and pretrains (or reuses) tiny-world, then plans the runs, runs what is missing
# (submitit; default 2 at a time, one torch thread each), collects and renders; --dry-run and --collect-only
# do neither of the first two (a dry run writes nothing and runs nothing).
# usage: bash scripts/tables/world_ablation.sh [--dry-run | --collect-only] [--jobs N] [--output DIR] [--data DIR]
#        [--launcher slurm --partition P --gpus-per-run G --time MIN]
# Tables: $OUTPUT/tables/world_ablation/ (default output/). All options: python -m tools.tables --help
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_world.sh"
world_table world_ablation "$@"
