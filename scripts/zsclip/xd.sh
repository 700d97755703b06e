#!/usr/bin/env bash
# Zero-shot CLIP, long-tailed cross-dataset: train on ImageNet (all 1000 classes, imbalance factor 100), test on the 10 other datasets.
# usage: bash scripts/zsclip/xd.sh [SEED ...]   (default seeds 1 2 3 4 5; env: see scripts/lib.sh)
set -euo pipefail
TRAINER=ZeroshotCLIP
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
xd "$@"
