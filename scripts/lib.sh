# Shared by scripts/<method>/*.sh (which set TRAINER, and CFG when they pin a config): maps the environment onto
# the run API's entry point (python -m tools.runs; the folder layout, the steps of each regime and the
# skip / resume / refuse rules live in engine/runs.py).
#
# Environment (all optional):
#   DATA     datasets root (default: <repo>/data)
#   OUTPUT   results root (default: <repo>/output)
#   LOSS     ce | la  ("+LA" baselines; la adds the suffix _la to the config folder)
#   CFG      trainer config name in configs/trainers/$TRAINER/ (default: the method's config for the benchmark,
#            from its registry entry, with its ImageNet variant)
#   EXTRA    extra KEY VALUE opts for every run, e.g. "OPTIM.MAX_EPOCH 5"; the runs go to their own config
#            folder <cfg>_<tag>, the tag derived from the opts (engine/run_identity.run_tag, run-neutral
#            keys such as DATALOADER.NUM_WORKERS left out), e.g. vit_b16_ep50_ctxv1_max_epoch5
#   TAG      name the variant folder <cfg>_$TAG yourself instead (letters, digits, . _ + -)
#   PYTHON   interpreter to use as is; unset: <repo>/.venv, created and filled from requirements.txt by
#            scripts/setup.sh when needed (as scripts/test.sh does)
#   XD_SOURCE, XD_IMB, XD_TARGETS, DG_TARGETS   source dataset / imbalance / target lists of xd and dg
#
# A seed whose results.json exists with the same resolved config is skipped; one with another config is an
# error; an unfinished one resumes from its last checkpoint. Nothing here deletes results. A failing run stops
# the script with exit code 2.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  source "$REPO/scripts/setup.sh"
fi

runs() {  # COMMAND [ARG ...]: python -m tools.runs COMMAND with the environment's settings
  local command="$1"; shift
  local opt=()
  [ -n "${XD_SOURCE:-}" ] && opt+=(--xd-source "$XD_SOURCE")
  [ -n "${XD_IMB:-}" ] && opt+=(--xd-imb "$XD_IMB")
  [ -n "${XD_TARGETS:-}" ] && opt+=(--xd-targets "$XD_TARGETS")
  [ -n "${DG_TARGETS:-}" ] && opt+=(--dg-targets "$DG_TARGETS")
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m tools.runs "$command" --prog "$0" \
    --trainer "${TRAINER:-}" --config "${CFG:-}" --loss "${LOSS:-ce}" --extra "${EXTRA:-}" --tag "${TAG:-}" \
    --data "${DATA:-$REPO/data}" --output "${OUTPUT:-$REPO/output}" "${opt[@]}" -- "$@"
}

cfg_tag() { runs config-folder; }      # the config folder name of CFG, LOSS, EXTRA / TAG
base2new() { runs base2new "$@"; }     # DATASET IMB [SEED ...]: long-tailed base-to-new
fewshot() { runs fewshot "$@"; }       # DATASET SHOTS [SEED ...]: balanced few-shot base-to-new
xd() { runs xd "$@"; }                 # [SEED ...]: train on XD_SOURCE, evaluate on XD_TARGETS
dg() { runs dg "$@"; }                 # [SEED ...]: the same source run, evaluated on DG_TARGETS
