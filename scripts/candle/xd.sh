#!/usr/bin/env bash
# Candle, long-tailed cross-dataset: train on ImageNet (all 1000 classes, imbalance factor 100), test on the 10 other datasets.
# usage: bash scripts/candle/xd.sh [SEED ...]   (default seeds 1 2 3 4 5; env: see scripts/lib.sh)
# Candle here trains once on the source (like every method); target classes that are not source classes keep
# their text-initialised prototypes (the reference instead retrains per target with its names; trainers/candle.py).
set -euo pipefail
TRAINER=Candle
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
xd "$@"
