# Sourced by scripts/tables/world_{benchmark,ablation}.sh (not a table of its own): run a world table spec
# through the table library (python -m tools.tables) after generating the world datasets into the data root
# (python -m tools.make_world) and pretraining or reusing the tiny-world CLIP (python -m tools.pretrain_clip,
# cached in the first weights folder, $CLIP_WEIGHTS_DIR or ~/.cache/clip), as scripts/demo.sh does. With
# --dry-run or --collect-only (or --help) it does neither: those only read. Defaults: --jobs 2 with one torch
# thread per run, --data $DATA or <repo>/data; any option given overrides them.
# PYTHON: interpreter to use as is; unset: <repo>/.venv (created by scripts/setup.sh when needed).
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  source "$REPO/scripts/setup.sh"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

world_table() {  # spec name, then the options of python -m tools.tables
  local spec="$1"; shift
  local data="${DATA:-$REPO/data}" prepare=1 prev="" arg
  for arg in "$@"; do
    [ "$prev" = "--data" ] && data="$arg"
    case "$arg" in
      --dry-run|--collect-only|-h|--help) prepare=0 ;;
      --data=*) data="${arg#--data=}" ;;
      --opts) break ;;   # everything after --opts is KEY VALUE opts for the runs
    esac
    prev="$arg"
  done
  if [ "$prepare" = 1 ]; then
    echo "[$spec] generating the world datasets under $data (kept when already there)"
    "$PYTHON" -m tools.make_world --root "$data"
    echo "[$spec] pretraining (or reusing) the tiny-world CLIP"
    "$PYTHON" -m tools.pretrain_clip --name tiny-world
  fi
  OMP_NUM_THREADS=1 exec "$PYTHON" -m tools.tables "$spec" --jobs 2 --data "$data" "$@"
}
