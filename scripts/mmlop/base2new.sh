#!/usr/bin/env bash
# MMLoP, long-tailed base-to-new: train on the base classes (cap 100/class, exponential profile, imbalance factor IMB), test on base and new.
# usage: bash scripts/mmlop/base2new.sh DATASET IMB [SEED ...]   (default seeds 1 2 3 4 5; env: see scripts/lib.sh)
set -euo pipefail
TRAINER=MMLoP
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
base2new "$@"
