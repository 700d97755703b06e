#!/usr/bin/env bash
# MMLoP paper, domain generalization from 16-shot ImageNet (the 4-variant average): plan the runs, run what is missing (submitit), collect, render.
# usage: bash scripts/tables/mmlop_dg.sh [--dry-run [--step-times FILE] | --collect-only] [--jobs N]
#        [--launcher slurm --partition P --gpus-per-run G --time MIN] [--output DIR] [--data DIR]
# Tables: $OUTPUT/tables/mmlop_dg/ (default output/). All options: python -m tools.tables --help
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../setup.sh"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m tools.tables mmlop_dg "$@"
