#!/usr/bin/env bash
# VaMP paper, 16-shot base-to-novel average (Base / Novel / HM): plan the runs, run what is missing (submitit), collect, render.
# usage: bash scripts/tables/vamp_b2n.sh [--dry-run [--step-times FILE] | --collect-only] [--jobs N]
#        [--launcher slurm --partition P --gpus-per-run G --time MIN] [--output DIR] [--data DIR]
# Tables: $OUTPUT/tables/vamp_b2n/ (default output/). All options: python -m tools.tables --help
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../setup.sh"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m tools.tables vamp_b2n "$@"
