#!/usr/bin/env bash
# VaMP, balanced few-shot base-to-new: SHOTS images per base class (the papers' 16-shot B2N), test on base and new.
# usage: bash scripts/vamp/fewshot.sh DATASET SHOTS [SEED ...]   (default seeds 1 2 3 4 5; env: see scripts/lib.sh)
set -euo pipefail
TRAINER=VaMP
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
fewshot "$@"
