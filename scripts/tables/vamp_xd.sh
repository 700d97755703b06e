#!/usr/bin/env bash
# VaMP paper, cross-dataset from 16-shot ImageNet: plan the runs, run what is missing (submitit), collect, render.
# usage: bash scripts/tables/vamp_xd.sh [--dry-run [--step-times FILE] | --collect-only] [--jobs N]
#        [--launcher slurm --partition P --gpus-per-run G --time MIN] [--output DIR] [--data DIR]
# Tables: $OUTPUT/tables/vamp_xd/ (default output/). All options: python -m tools.tables --help
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../setup.sh"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m tools.tables vamp_xd "$@"
