#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite (CPU, random-weight CLIP, generated images).
# usage: bash scripts/test.sh [pytest args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec "$PYTHON" -m pytest -c "$REPO/pytest.ini" --rootdir "$REPO" "$REPO/tests" "$@"
