#!/usr/bin/env bash
# MMLoP, long-tailed domain generalization: train on ImageNet (imbalance factor 100), test on ImageNet-V2/-Sketch/-A/-R.
# usage: bash scripts/mmlop/dg.sh [SEED ...]   (default seeds 1 2 3 4 5; env: see scripts/lib.sh)
set -euo pipefail
TRAINER=MMLoP
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
dg "$@"
