#!/usr/bin/env bash
# MMLoP, balanced few-shot base-to-new: SHOTS images per base class (the papers' 16-shot B2N), test on base and new.
# usage: bash scripts/mmlop/fewshot.sh DATASET SHOTS [SEED ...]   (default seeds 1 2 3 4 5; env: see scripts/lib.sh)
set -euo pipefail
TRAINER=MMLoP
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
fewshot "$@"
