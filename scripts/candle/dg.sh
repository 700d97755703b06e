#!/usr/bin/env bash
# Candle, long-tailed domain generalization: train on ImageNet (imbalance factor 100), test on ImageNet-V2/-Sketch/-A/-R.
# usage: bash scripts/candle/dg.sh [SEED ...]   (default seeds 1 2 3 4 5; env: see scripts/lib.sh)
# ImageNet-V2/-Sketch use the trained prototypes of all 1000 classes; ImageNet-A/-R (200-class subsets) are
# matched to them by class name (trainers/candle.py).
set -euo pipefail
TRAINER=Candle
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
dg "$@"
