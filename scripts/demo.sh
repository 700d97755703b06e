#!/usr/bin/env bash
# The main job on the embedded default: set up .venv if needed, generate the demo world's datasets, pretrain
# the small `tiny-world` CLIP on that world (once; cached in the weights folder), run the long-tailed
# base-to-new benchmark (imbalance factor 10, seed 1) for every method in the demo list on every demo
# dataset with shortened schedules, and write the table, one plot and REPORT.md.
#
# Backbone: OpenAI ViT-B/16 when its weights are found locally (see README, "CLIP weights"), else
# `tiny-world`, built by `python -m tools.pretrain_clip` into the first weights folder ($CLIP_WEIGHTS_DIR or
# ~/.cache/clip) and reused by later runs. DEMO_BACKBONE=tiny-world|ViT-B/16|tiny forces one.
# Outputs go to $DEMO_OUTPUT (default output/demo); a rerun skips finished runs.
# Environment (optional): DEMO_DATASETS, DEMO_METHODS (method or method+la, e.g. "coop+la lamp"),
# DEMO_JOBS (runs in parallel, default 2, one torch thread each), DEMO_FULL=1 (the configs' own epochs),
# DEMO_EXTRA (extra KEY VALUE opts for every run).
# usage: bash scripts/demo.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

DEMO_OUTPUT="${DEMO_OUTPUT:-output/demo}"
DEMO_DATASETS="${DEMO_DATASETS:-world_shapes world_clutter world_textures}"
DEMO_METHODS="${DEMO_METHODS:-zsclip coop coop+la cocoop+la maple+la mma+la tcp+la candle lfa lamp}"
DEMO_JOBS="${DEMO_JOBS:-2}"
export DATA="$DEMO_OUTPUT/data" OUTPUT="$DEMO_OUTPUT"
LOGS="$DEMO_OUTPUT/logs"
TIMINGS="$DEMO_OUTPUT/timings.tsv"
mkdir -p "$LOGS"
: > "$TIMINGS"
demo_start=$SECONDS
py() { PYTHONPATH="$REPO" OMP_NUM_THREADS=1 "$PYTHON" "$@"; }

t0=$SECONDS
py -m tools.make_world --root "$DATA"
printf 'data\t%s\n' $((SECONDS - t0)) >> "$TIMINGS"

backbone="${DEMO_BACKBONE:-}"
if [ -z "$backbone" ]; then
  if weights="$(py -c 'from engine.clip_loader import resolve_weights_path as r; print(r("ViT-B/16"))' 2>/dev/null)"; then
    echo "[demo] using the OpenAI ViT-B/16 weights at $weights"
    backbone="ViT-B/16"
  else
    backbone="tiny-world"
  fi
fi
case "$backbone" in
  ViT-B/16) EXTRA="MODEL.BACKBONE.NAME ViT-B/16 DATALOADER.NUM_WORKERS 2" ;;
  tiny-world)
    t0=$SECONDS
    echo "[demo] pretraining (or reusing) the tiny-world CLIP on the generated world"
    py -m tools.pretrain_clip --name tiny-world 2>&1 | tee "$LOGS/pretrain.log"
    printf 'pretrain\t%s\n' $((SECONDS - t0)) >> "$TIMINGS"
    EXTRA="MODEL.BACKBONE.NAME tiny-world INPUT.SIZE (32,32) DATALOADER.NUM_WORKERS 0" ;;
  tiny)
    echo "[demo] random-weight 'tiny' CLIP: accuracies are near chance (the pipeline, not CLIP's knowledge)"
    EXTRA="MODEL.BACKBONE.NAME tiny INPUT.SIZE (32,32) DATALOADER.NUM_WORKERS 0" ;;
  *) echo "error: DEMO_BACKBONE must be tiny-world, ViT-B/16 or tiny, got '$backbone'" >&2; exit 2 ;;
esac
export EXTRA="$EXTRA ${DEMO_EXTRA:-}"

# Shortened schedules so the whole demo fits in a few minutes on 2 CPU cores; everything else is the
# method's default config. DEMO_FULL=1 runs the configs' own epoch counts.
demo_schedule() {
  [ -n "${DEMO_FULL:-}" ] && return 0
  case "$1" in
    coop|tcp) echo "OPTIM.MAX_EPOCH 10" ;;
    candle) echo "OPTIM.MAX_EPOCH 10" ;;
    cocoop) echo "OPTIM.MAX_EPOCH 1" ;;
    maple|mma|lamp) echo "OPTIM.MAX_EPOCH 3" ;;
  esac
}

run_job() {  # METHOD[+la] DATASET
  local method="${1%+la}" loss=ce dataset="$2" t0=$SECONDS
  [ "$1" != "$method" ] && loss=la
  local log="$LOGS/${dataset}_$1.log"
  OMP_NUM_THREADS=1 LOSS="$loss" EXTRA="$EXTRA $(demo_schedule "$method")" \
    bash "$REPO/scripts/$method/base2new.sh" "$dataset" 10 1 > "$log" 2>&1 \
    || { echo "[demo] $1 on $dataset failed; see $log" >&2; tail -n 20 "$log" >&2; return 1; }
  echo "[demo] $1 on $dataset done in $((SECONDS - t0)) s"
  printf 'run %s %s\t%s\n' "$1" "$dataset" $((SECONDS - t0)) >> "$TIMINGS"
}

for m in $DEMO_METHODS; do
  [ -f "$REPO/scripts/${m%+la}/base2new.sh" ] || { echo "error: unknown demo method '$m' (no scripts/${m%+la}/base2new.sh)" >&2; exit 2; }
done
t0=$SECONDS
failed=0 running=0
for dataset in $DEMO_DATASETS; do
  for m in $DEMO_METHODS; do
    run_job "$m" "$dataset" &
    running=$((running + 1))
    if [ "$running" -ge "$DEMO_JOBS" ]; then
      wait -n || failed=1
      running=$((running - 1))
    fi
  done
done
while [ "$running" -gt 0 ]; do wait -n || failed=1; running=$((running - 1)); done
[ "$failed" = 0 ] || { echo "[demo] some runs failed (see above)" >&2; exit 1; }
printf 'runs\t%s\n' $((SECONDS - t0)) >> "$TIMINGS"
echo "[demo] all runs done in $((SECONDS - t0)) s"

printf 'total\t%s\n' $((SECONDS - demo_start)) >> "$TIMINGS"
py -m tools.demo_report "$DEMO_OUTPUT" --backbone "$backbone"
