#!/usr/bin/env bash
# Download, verify and unpack datasets (and CLIP weights) under $DATA: the only command that downloads.
# usage: bash scripts/prepare_data.sh [--root $DATA] DATASET... | all
#        bash scripts/prepare_data.sh --list
#        bash scripts/prepare_data.sh --weights ViT-B/16
# Resumable (rerun after an interruption), verified (SHA-256, tools.check_data); a second run downloads
# nothing. PYTHON picks the interpreter (default: the project's .venv, created if needed by setup.sh).
# Sources: configs/data_sources.tsv. Details: python -m tools.prepare_data --help, docs/DATASETS.md.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  source "$REPO/scripts/setup.sh"
fi
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m tools.prepare_data "$@"
