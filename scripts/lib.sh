# Shared benchmark loops, sourced by scripts/<method>/*.sh (which set TRAINER and CFG first).
#
# Environment (all optional):
#   DATA     datasets root (default: <repo>/data)
#   OUTPUT   results root (default: <repo>/output)
#   LOSS     ce | la  ("+LA" baselines; la adds the suffix _la to the config folder)
#   CFG      trainer config name in configs/trainers/$TRAINER/ (each script has its default)
#   EXTRA    extra KEY VALUE opts for every run, e.g. "OPTIM.MAX_EPOCH 5"; the runs go to their own config
#            folder <cfg>_<tag>, the tag derived from the opts (engine/run_identity.run_tag, run-neutral
#            keys such as DATALOADER.NUM_WORKERS left out), e.g. vit_b16_ep50_ctxv1_max_epoch5
#   TAG      name the variant folder <cfg>_$TAG yourself instead (letters, digits, . _ + -)
#   PYTHON   interpreter to use as is; unset: <repo>/.venv, created and filled from requirements.txt by
#            scripts/setup.sh when needed (as scripts/test.sh does)
#   XD_SOURCE, XD_IMB, XD_TARGETS, DG_TARGETS   source dataset / imbalance / target lists of xd and dg
#
# Output layout (CoOp/MaPLe/Candle style):
#   $OUTPUT/base2new_imb<IMB>/train_base/<dataset>/<TRAINER>/<cfg>/seed<S>/   train on base, test on base
#   $OUTPUT/base2new_imb<IMB>/test_new/<dataset>/<TRAINER>/<cfg>/seed<S>/     test the same model on new
# A seed whose results.json exists with the same resolved config is skipped; one with another config is an
# error (train.py --skip-finished); an unfinished one resumes from its last checkpoint.
# Runs share the data caches in $OUTPUT/cache (capped splits, ImageNet's folder scan).
# Nothing here deletes results. A failing run stops the script with train.py's exit code.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  source "$REPO/scripts/setup.sh"
fi
DATA="${DATA:-$REPO/data}"
OUTPUT="${OUTPUT:-$REPO/output}"
LOSS="${LOSS:-ce}"
EXTRA="${EXTRA:-}"
TAG="${TAG:-}"

die() { echo "error: $*" >&2; exit 2; }

check_int() {  # name value
  [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a positive integer, got '$2'"
}

cfg_tag() {  # folder name of the config: CFG (+ _la) (+ the variant tag of EXTRA, or _$TAG)
  local name="$CFG" variant words err
  read -ra words <<< "$EXTRA"
  (( ${#words[@]} % 2 == 0 )) \
    || die "EXTRA must be KEY VALUE pairs, got an odd number of words (${#words[@]}): '$EXTRA'"
  [ "$LOSS" = "la" ] && name="${name}_la"
  if [ -n "$TAG" ]; then
    [[ "$TAG" =~ ^[A-Za-z0-9._+-]+$ ]] || die "TAG may hold letters, digits and . _ + - only, got '$TAG'"
    variant="_$TAG"
  else
    err="$(mktemp)"
    # shellcheck disable=SC2086
    variant="$(PYTHONPATH="$REPO" "$PYTHON" -c \
      'import sys; from engine.run_identity import run_tag; print(run_tag(sys.argv[1:]))' $EXTRA 2>"$err")" \
      || { local why; why="$(tail -n 1 "$err")"; rm -f "$err"
           die "cannot derive a folder tag from EXTRA='$EXTRA' (KEY VALUE pairs expected): $why"; }
    rm -f "$err"
  fi
  echo "${name}${variant}"
}

# run_one OUTDIR DATASET [--eval-only --model-dir DIR] -- KEY VALUE ...
run_one() {
  local outdir="$1" dataset="$2"; shift 2
  local flags=()
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do flags+=("$1"); shift; done
  [ "${1:-}" = "--" ] && shift
  local dcfg="$REPO/configs/datasets/$dataset.yaml"
  local tcfg="$REPO/configs/trainers/$TRAINER/$CFG.yaml"
  [ -f "$dcfg" ] || die "no dataset config $dcfg (datasets: $(ls "$REPO/configs/datasets" | sed 's/.yaml//' | tr '\n' ' '))"
  [ -f "$tcfg" ] || die "no trainer config $tcfg"
  echo "[run] $outdir"
  # shellcheck disable=SC2086
  "$PYTHON" "$REPO/train.py" --root "$DATA" --seed "$SEED" --trainer "$TRAINER" \
    --dataset-config-file "$dcfg" --config-file "$tcfg" --output-dir "$outdir" --skip-finished \
    "${flags[@]}" DATASET.CACHE_DIR "$OUTPUT/cache" "$@" TRAINER.LOSS "$LOSS" $EXTRA
}

results_at() {  # EXPERIMENT_ROOT RUN_PATTERN: say where a benchmark's results go
  echo "[$TRAINER] results go to $1/$2/seed<S>/ (table: python -m tools.collect_results $1)"
}

# Train on base classes (unless the method has nothing to train), then test on base and on new.
# b2n_seeds EXPERIMENT DATASET SHOTS IMB SEED...
b2n_seeds() {
  local exp="$1" dataset="$2" shots="$3" imb="$4"; shift 4
  local tag; tag="$(cfg_tag)"
  results_at "$OUTPUT/$exp" "{train_base,test_new}/$dataset/$TRAINER/$tag"
  for SEED in "$@"; do
    local train_dir="$OUTPUT/$exp/train_base/$dataset/$TRAINER/$tag/seed$SEED"
    local new_dir="$OUTPUT/$exp/test_new/$dataset/$TRAINER/$tag/seed$SEED"
    run_one "$train_dir" "$dataset" -- DATASET.NUM_SHOTS "$shots" DATASET.IMB_FACTOR "$imb" \
      DATASET.SUBSAMPLE_CLASSES base
    run_one "$new_dir" "$dataset" --eval-only --model-dir "$train_dir" -- DATASET.NUM_SHOTS "$shots" \
      DATASET.IMB_FACTOR "$imb" DATASET.SUBSAMPLE_CLASSES new
  done
}

# Long-tailed base-to-new: per-class cap 100, exponential profile with imbalance factor IMB.
base2new() {  # DATASET IMB [SEED...]
  [ "$#" -ge 2 ] || die "usage: $0 DATASET IMB [SEED ...]   (e.g. caltech101 10 1 2 3)"
  local dataset="$1" imb="$2"; shift 2
  check_int IMB "$imb"
  local seeds=("$@"); [ "${#seeds[@]}" -gt 0 ] || seeds=(1 2 3 4 5)
  b2n_seeds "base2new_imb$imb" "$dataset" 100 "$imb" "${seeds[@]}"
}

# Balanced few-shot base-to-new (e.g. 16 shots).
fewshot() {  # DATASET SHOTS [SEED...]
  [ "$#" -ge 2 ] || die "usage: $0 DATASET SHOTS [SEED ...]   (e.g. caltech101 16 1 2 3)"
  local dataset="$1" shots="$2"; shift 2
  check_int SHOTS "$shots"
  local seeds=("$@"); [ "${#seeds[@]}" -gt 0 ] || seeds=(1 2 3 4 5)
  b2n_seeds "fewshot_${shots}shots" "$dataset" "$shots" 1 "${seeds[@]}"
}

XD_SOURCE="${XD_SOURCE:-imagenet}"
XD_IMB="${XD_IMB:-100}"
XD_TARGETS="${XD_TARGETS:-caltech101 oxford_pets stanford_cars oxford_flowers food101 fgvc_aircraft sun397 dtd eurosat ucf101}"
DG_TARGETS="${DG_TARGETS:-imagenetv2 imagenet_sketch imagenet_a imagenet_r}"

# Train once on the long-tailed source (all classes), then evaluate on each target dataset.
# transfer EXPERIMENT TARGETS SEED...
transfer() {
  local exp="$1" targets="$2"; shift 2
  local tag; tag="$(cfg_tag)"
  local seeds=("$@"); [ "${#seeds[@]}" -gt 0 ] || seeds=(1 2 3 4 5)
  results_at "$OUTPUT/$exp" "test_all/<target>/$TRAINER/$tag"
  for SEED in "${seeds[@]}"; do
    # Both benchmarks share one source run per seed.
    local train_dir="$OUTPUT/xd_imb$XD_IMB/train_all/$XD_SOURCE/$TRAINER/$tag/seed$SEED"
    run_one "$train_dir" "$XD_SOURCE" -- DATASET.NUM_SHOTS 100 DATASET.IMB_FACTOR "$XD_IMB" \
      DATASET.SUBSAMPLE_CLASSES all
    for target in $targets; do
      run_one "$OUTPUT/$exp/test_all/$target/$TRAINER/$tag/seed$SEED" "$target" --eval-only \
        --model-dir "$train_dir" -- DATASET.SUBSAMPLE_CLASSES all
    done
  done
}

xd() { transfer "xd_imb$XD_IMB" "$XD_TARGETS" "$@"; }
dg() { transfer "dg_imb$XD_IMB" "$DG_TARGETS" "$@"; }
