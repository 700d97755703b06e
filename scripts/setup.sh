# Sourced by demo.sh and test.sh: create .venv (if absent) and install the pinned requirements (if they
# changed since the last install). Sets PYTHON and REPO.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  command -v python3 >/dev/null || { echo "error: python3 (>= 3.10) is needed to create $VENV" >&2; exit 2; }
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "error: python3 >= 3.10 is needed, found $(python3 --version 2>&1)" >&2; exit 2; }
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
_want="$(sha256sum "$REPO/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$_want" ]; then
  echo "[setup] installing requirements.txt into $VENV (pinned; CPU torch here, CUDA torch on GPU machines)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REPO/requirements.txt"
  echo "$_want" > "$VENV/.requirements.sha256"
fi
PYTHON="$VENV/bin/python"
export PYTHON
