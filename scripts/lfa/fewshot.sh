#!/usr/bin/env bash
# LFA, balanced few-shot base-to-new: SHOTS images per base class, test on base and new.
# usage: bash scripts/lfa/fewshot.sh DATASET SHOTS [SEED ...]   (default seeds 1 2 3 4 5; env: see scripts/lib.sh)
# Iterations per dataset: TRAINER.LFA.ITERS_PER_DATASET in the config (LFA's B2N table); override with
# EXTRA="TRAINER.LFA.ITERS N".
set -euo pipefail
TRAINER=LFA
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
fewshot "$@"
