#!/usr/bin/env bash
# TCP, long-tailed base-to-new: train on the base classes (cap 100/class, exponential profile, imbalance factor IMB), test on base and new.
# usage: bash scripts/tcp/base2new.sh DATASET IMB [SEED ...]   (default seeds 1 2 3 4 5; env: see scripts/lib.sh)
set -euo pipefail
TRAINER=TCP
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
base2new "$@"
