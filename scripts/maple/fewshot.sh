#!/usr/bin/env bash
# MaPLe, balanced few-shot base-to-new: SHOTS images per base class, test on base and new.
# usage: bash scripts/maple/fewshot.sh DATASET SHOTS [SEED ...]   (default seeds 1 2 3 4 5; env: see scripts/lib.sh)
set -euo pipefail
TRAINER=MaPLe
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
fewshot "$@"
