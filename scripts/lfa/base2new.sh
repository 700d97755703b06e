#!/usr/bin/env bash
# LFA, long-tailed base-to-new: train on the base classes (cap 100/class, exponential profile, imbalance factor IMB), test on base and new.
# usage: bash scripts/lfa/base2new.sh DATASET IMB [SEED ...]   (default seeds 1 2 3 4 5; env: see scripts/lib.sh)
# Iterations per dataset: TRAINER.LFA.ITERS_PER_DATASET in the config (LFA's B2N table); override with
# EXTRA="TRAINER.LFA.ITERS N".
set -euo pipefail
TRAINER=LFA
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
base2new "$@"
