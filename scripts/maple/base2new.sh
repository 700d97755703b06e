#!/usr/bin/env bash
# MaPLe, long-tailed base-to-new: train on the base classes (cap 100/class, exponential profile, imbalance factor IMB), test on base and new.
# usage: bash scripts/maple/base2new.sh DATASET IMB [SEED ...]   (default seeds 1 2 3 4 5; env: see scripts/lib.sh)
set -euo pipefail
TRAINER=MaPLe
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
base2new "$@"
