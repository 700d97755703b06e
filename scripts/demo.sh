#!/usr/bin/env bash
# The main job on the embedded default: set up .venv if needed, generate the demo world's datasets, pretrain
# the small `tiny-world` CLIP on that world (once; cached in the weights folder), run the long-tailed
# base-to-new benchmark (imbalance factor 10, seed 1) of the table spec configs/tables/demo.yaml (every
# method, shortened schedules, three demo datasets) through the table library, and write the table, one plot
# and REPORT.md.
#
# Backbone: OpenAI ViT-B/16 when its weights are found locally (see README, "CLIP weights"), else
# `tiny-world`, built by `python -m tools.pretrain_clip` into the first weights folder ($CLIP_WEIGHTS_DIR or
# ~/.cache/clip) and reused by later runs. DEMO_BACKBONE=tiny-world|ViT-B/16|tiny forces one.
# Outputs go to $DEMO_OUTPUT (default <repo>/output/demo); a rerun skips finished runs.
# Environment (optional): DEMO_JOBS (runs in parallel, default 2, one torch thread each), DEMO_EXTRA (extra
# KEY VALUE opts for every run; they name the run folders). Methods, datasets and schedules: edit
# configs/tables/demo.yaml (or run python -m tools.tables on a spec of your own).
# --launcher slurm: the runs go to a SLURM cluster as one job array (DEMO_JOBS tasks at a time): the one
# SLURM_CONF or /etc/slurm names, else the local one of scripts/slurm_local.sh (start it first with
# `bash scripts/slurm_local.sh up`), on its default partition with 1 GPU per run when its nodes have GPUs (else
# none) and 1 CPU per run (3 for ViT-B/16); other requests: python -m tools.tables demo --launcher slurm --help.
# usage: bash scripts/demo.sh [--launcher local|slurm]
set -euo pipefail
read -r -a demo_extra <<< "${DEMO_EXTRA:-}"
(( ${#demo_extra[@]} % 2 == 0 )) \
  || { echo "error: DEMO_EXTRA must be KEY VALUE pairs, got an odd number of words: '${DEMO_EXTRA:-}'" >&2; exit 2; }
launcher=local
while [ $# -gt 0 ]; do
  case "$1" in
    --launcher) [ $# -ge 2 ] || { echo "error: --launcher needs a value (local or slurm)" >&2; exit 2; }
                launcher="$2"; shift 2 ;;
    --launcher=*) launcher="${1#--launcher=}"; shift ;;
    *) echo "error: unknown argument '$1' (usage: bash scripts/demo.sh [--launcher local|slurm])" >&2; exit 2 ;;
  esac
done
case "$launcher" in
  local|slurm) ;;
  *) echo "error: --launcher must be local or slurm, got '$launcher'" >&2; exit 2 ;;
esac
if [ "$launcher" = slurm ]; then
  # A cluster configured for this shell first; else the local one of scripts/slurm_local.sh, when it is up.
  slurm_local="$(dirname "${BASH_SOURCE[0]}")/slurm_local.sh"
  if [ -n "${SLURM_CONF:-}" ]; then   # (sinfo would retry a missing file for a minute)
    [ -f "$SLURM_CONF" ] || { echo "error: --launcher slurm: SLURM_CONF is $SLURM_CONF, which is not a file" >&2; exit 2; }
  elif [ ! -f /etc/slurm/slurm.conf ] && bash "$slurm_local" status >/dev/null 2>&1; then
    eval "$(bash "$slurm_local" env)"
    echo "[demo] using the local SLURM cluster of scripts/slurm_local.sh ($SLURM_CONF)"
  fi
  timeout 90 sinfo >/dev/null 2>&1 || { echo "error: --launcher slurm: no SLURM cluster answers sinfo; start the local one with: bash scripts/slurm_local.sh up" >&2; exit 2; }
fi
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

DEMO_OUTPUT="${DEMO_OUTPUT:-$REPO/output/demo}"
DEMO_JOBS="${DEMO_JOBS:-2}"
echo "[demo] outputs go to $DEMO_OUTPUT (REPORT.md, demo_plot.png, tables/demo/, runs under base2new_imb10/)"
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

# The runs are the table spec configs/tables/demo.yaml (methods, their shortened schedules, the three demo
# datasets), launched through the table library: submitit's local executor, or one SLURM job array; DEMO_JOBS
# runs at a time, one torch thread each; finished runs are skipped on a rerun. The table goes to
# $DEMO_OUTPUT/tables/demo/.
if [ "$launcher" = slurm ]; then
  gpus=0
  if sinfo -h -o %G 2>/dev/null | grep -q gpu; then gpus=1; fi
  cpus=1
  if [ "$backbone" = ViT-B/16 ]; then cpus=3; fi   # its 2 data-loader workers and the run
  launch=(--launcher slurm --gpus-per-run "$gpus" --cpus-per-run "$cpus" --array-parallelism "$DEMO_JOBS")
  echo "[demo] launching through SLURM: one job array, $DEMO_JOBS task(s) at a time, $gpus GPU(s) and $cpus CPU(s) per run"
else
  launch=(--jobs "$DEMO_JOBS")
fi
t0=$SECONDS
read -r -a opts <<< "$EXTRA"
OMP_NUM_THREADS=1 py -m tools.tables demo --output "$DEMO_OUTPUT" --data "$DATA" "${launch[@]}" \
  --opts "${opts[@]}" 2>&1 | tee "$LOGS/tables.log"
rc=${PIPESTATUS[0]}
printf 'runs\t%s\n' $((SECONDS - t0)) >> "$TIMINGS"
[ "$rc" = 0 ] || { echo "[demo] some runs failed: see $LOGS/tables.log and the table_error.log of each failed run" >&2; exit "$rc"; }
echo "[demo] all runs done in $((SECONDS - t0)) s"

printf 'total\t%s\n' $((SECONDS - demo_start)) >> "$TIMINGS"
py -m tools.demo_report "$DEMO_OUTPUT" --data "$DATA" --backbone "$backbone" --opts "${opts[@]}"
