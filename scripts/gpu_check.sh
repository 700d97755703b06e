#!/usr/bin/env bash
# The GPU check of issue 20 (tools/gpu_check.py): precision, utilisation, cross-dataset memory, Table 5's step
# times and step-time files, written to OUT/report.md, OUT/report.json and OUT/step_times/.
# usage: bash scripts/gpu_check.sh --out DIR [--cpu-smoke]
# Without CUDA it exits 2 (one line); --cpu-smoke runs the same code paths on CPU with the tiny backbone.
set -euo pipefail
if [ -z "${PYTHON:-}" ]; then
  source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "$PYTHON" "$REPO/tools/gpu_check.py" "$@"
