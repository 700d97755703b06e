#!/usr/bin/env bash
# MMA, balanced few-shot base-to-new: SHOTS images per base class, test on base and new.
# usage: bash scripts/mma/fewshot.sh DATASET SHOTS [SEED ...]   (default seeds 1 2 3 4 5; env: see scripts/lib.sh)
set -euo pipefail
TRAINER=MMA
# its registry entry picks the official balanced config: batch 16, ImageNet 128 (the LT scripts keep vit_b16_ep5, batch 4)
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
fewshot "$@"
