#!/usr/bin/env bash
# World benchmark: long-tailed base-to-new (imb 10 / 50) on the three generated world datasets, every method of
# Table 1 as Table 1 configures it + zero-shot CLIP, seeds 1-3, tiny-world CLIP (configs/tables/world_benchmark.yaml).
# Generates the world data and pretrains (or reuses) tiny-world, then plans the runs, runs what is missing
# (submitit; default 2 at a time, one torch thread each), collects and renders; --dry-run and --collect-only
# do neither of the first two (a dry run writes nothing and runs nothing).
# usage: bash scripts/tables/world_benchmark.sh [--dry-run | --collect-only] [--jobs N] [--output DIR] [--data DIR]
#        [--launcher slurm --partition P --gpus-per-run G --time MIN]
# Tables: $OUTPUT/tables/world_benchmark/ (default output/). All options: python -m tools.tables --help
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_world.sh"
world_table world_benchmark "$@"
