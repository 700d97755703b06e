#!/usr/bin/env bash
# CoOp, long-tailed domain generalization: train on ImageNet (imbalance factor 100), test on ImageNet-V2/-Sketch/-A/-R.
# usage: bash scripts/coop/dg.sh [SEED ...]   (default seeds 1 2 3 4 5; env: see scripts/lib.sh)
set -euo pipefail
TRAINER=CoOp
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
dg "$@"
