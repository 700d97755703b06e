#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian's slurm-wlm + munge), for the table launcher's SLURM path
# (python -m tools.tables SPEC --launcher slurm, scripts/demo.sh --launcher slurm) and its tests.
# Config, munge key, state and logs live in one work folder; nothing is written to /etc. The cluster uses
# proctrack/linuxproc and select/cons_tres (each CPU allocatable; GPUs /dev/nvidiaN become gres gpu) and has
# no accounting daemon, so `sacct` is unavailable there (the launcher reads job states from squeue).
# usage: bash scripts/slurm_local.sh up | down | status | env
#   up      install slurm-wlm and munge when missing (apt-get), start munged, slurmctld and slurmd, wait until
#           the node is idle; when the cluster is already up it only checks that
#   status  the cluster's sinfo and squeue (exit 1 when it is not up)
#   down    cancel the cluster's jobs and stop its daemons (config and state stay in the work folder)
#   env     print `export SLURM_CONF=...`: eval "$(bash scripts/slurm_local.sh env)" lets sinfo, sbatch and
#           the launcher of this shell find the cluster (scripts/demo.sh --launcher slurm does it itself)
# Environment: SLURM_LOCAL_DIR (the work folder, default ~/.local/state/ltpl-slurm), SLURM_LOCAL_PORT
# (slurmctld's port, slurmd takes the next one; default 6817), SLURM_LOCAL_RUN_DIR (munge's socket, default
# /run/ltpl-slurm-PORT: munged needs its folders reachable by all), SLURM_LOCAL_WAIT_S (how long `up` waits for
# the node, default 90). Runs as root (slurmd starts each job as its user).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

DIR="${SLURM_LOCAL_DIR:-${XDG_STATE_HOME:-${HOME:-/root}/.local/state}/ltpl-slurm}"
PORT="${SLURM_LOCAL_PORT:-6817}"
WAIT_S="${SLURM_LOCAL_WAIT_S:-90}"
CONF="$DIR/slurm.conf"
# munged wants every folder above its socket reachable by all users, which a home folder often is not: the
# socket lives in a runtime folder of its own (per port, so two clusters on one machine do not share it).
SOCKET_DIR="${SLURM_LOCAL_RUN_DIR:-/run/ltpl-slurm-$PORT}"
SOCKET="$SOCKET_DIR/munge.socket"
NODE="$(hostname -s)"
export SLURM_CONF="$CONF"

die() { echo "error: $*" >&2; exit 2; }
log() { echo "[slurm_local] $*"; }
[[ "$PORT" =~ ^[0-9]+$ ]] || die "SLURM_LOCAL_PORT must be a port number, got '$PORT'"
[[ "$WAIT_S" =~ ^[0-9]+$ ]] || die "SLURM_LOCAL_WAIT_S must be a number of seconds, got '$WAIT_S'"

# pid of a daemon of this cluster when it is alive (pid file present, process running under that name)
alive() {
  local pidfile="$1" name="$2" pid
  pid="$(cat "$pidfile" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] && echo "$pid"
}

install_packages() {
  local missing=()
  for cmd in munged mungekey slurmctld slurmd sbatch squeue sinfo scontrol scancel; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  [ ${#missing[@]} = 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}: install Debian's slurm-wlm and munge (as root: apt-get install slurm-wlm munge)"
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install slurm-wlm and munge with"
  log "installing slurm-wlm and munge (missing: ${missing[*]})"
  local out
  out="$(mktemp)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge; } \
    >"$out" 2>&1 || { cat "$out" >&2; rm -f "$out"; die "could not install slurm-wlm and munge"; }
  rm -f "$out"
}

write_config() {
  local hw gpus=() gres_line="" gres_types=""
  hw="$(slurmd -C | head -n 1)"                      # NodeName=... CPUs=... Boards=... RealMemory=...
  [[ "$hw" == NodeName=* ]] || die "slurmd -C did not describe this machine: $hw"
  hw="NodeName=$NODE ${hw#NodeName=* }"
  shopt -s nullglob
  for dev in /dev/nvidia[0-9]*; do gpus+=("$dev"); done
  shopt -u nullglob
  if [ ${#gpus[@]} -gt 0 ]; then
    gres_types="GresTypes=gpu"
    gres_line=" Gres=gpu:${#gpus[@]}"
    printf 'AutoDetect=off\n' > "$DIR/gres.conf"
    for dev in "${gpus[@]}"; do printf 'NodeName=%s Name=gpu File=%s\n' "$NODE" "$dev" >> "$DIR/gres.conf"; done
  else
    rm -f "$DIR/gres.conf"
  fi
  cat > "$CONF.tmp" <<EOF
# Written by scripts/slurm_local.sh (rewritten at each start); the work folder holds state and logs.
ClusterName=ltpl-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state/slurmctld
SlurmdSpoolDir=$DIR/state/slurmd
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
EnforcePartLimits=ALL
JobRequeue=1
KillWait=2
MinJobAge=600
$gres_types
$hw NodeAddr=127.0.0.1$gres_line State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1; }

show_log() { echo "--- $1 (last lines)" >&2; tail -n 20 "$1" >&2 2>/dev/null || true; }

up() {
  [ "$(id -u)" = 0 ] || die "the local cluster runs as root (slurmd starts jobs as their users); run it as root"
  install_packages
  mkdir -p "$DIR"/{munge,run,log,state/slurmctld,state/slurmd} "$SOCKET_DIR"
  chmod 700 "$DIR/munge"
  chmod 755 "$SOCKET_DIR"
  if ! alive "$DIR/munge/munged.pid" munged >/dev/null; then
    if [ ! -s "$DIR/munge/munge.key" ]; then
      mungekey --create --keyfile="$DIR/munge/munge.key"
      chmod 600 "$DIR/munge/munge.key"
    fi
    rm -f "$SOCKET" "$SOCKET.lock"
    munged --socket="$SOCKET" --key-file="$DIR/munge/munge.key" \
      --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/munged.seed" --log-file="$DIR/log/munged.log" \
      || { show_log "$DIR/log/munged.log"; die "munged did not start"; }
    log "munged started"
  fi
  local ctld=0 slurmd_up=0
  alive "$DIR/run/slurmctld.pid" slurmctld >/dev/null && ctld=1
  alive "$DIR/run/slurmd.pid" slurmd >/dev/null && slurmd_up=1
  if [ $ctld = 0 ] && [ $slurmd_up = 0 ]; then
    write_config
  fi
  if [ $ctld = 0 ]; then
    slurmctld -f "$CONF" || { show_log "$DIR/log/slurmctld.log"; die "slurmctld did not start"; }
    log "slurmctld started (port $PORT)"
  fi
  if [ $slurmd_up = 0 ]; then
    slurmd -f "$CONF" -N "$NODE" || { show_log "$DIR/log/slurmd.log"; die "slurmd did not start"; }
    log "slurmd started (node $NODE)"
  fi
  local state="" waited=0 resumed=0
  while [ $waited -lt "$WAIT_S" ]; do
    state="$(node_state)"
    case "$state" in
      idle|mixed|allocated|completing) break ;;
      down*|drain*|drained*)   # e.g. left down by an unclean stop: the node is ours, put it back
        if [ $resumed = 0 ]; then scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true; resumed=1; fi ;;
    esac
    sleep 1
    waited=$((waited + 1))
  done
  case "$state" in
    idle|mixed|allocated|completing) ;;
    *) show_log "$DIR/log/slurmctld.log"; show_log "$DIR/log/slurmd.log"
       die "node $NODE is '${state:-unknown}' after ${WAIT_S} s (logs under $DIR/log)" ;;
  esac
  log "up: node $NODE $state; config $CONF"
  log "in another shell: eval \"\$(bash scripts/slurm_local.sh env)\" (or export SLURM_CONF=$CONF)"
}

stop_pid() {  # TERM, then KILL after 15 s
  local pid="$1" i
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
}

down() {
  local pid jobs
  if alive "$DIR/run/slurmctld.pid" slurmctld >/dev/null; then
    jobs="$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')"
    if [ -n "${jobs// /}" ]; then
      log "cancelling jobs $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 30); do
        [ -z "$(squeue -h -t RUNNING,COMPLETING,CONFIGURING -o %A 2>/dev/null)" ] && break
        sleep 1
      done
    fi
  fi
  for d in slurmd slurmctld; do
    if pid="$(alive "$DIR/run/$d.pid" "$d")"; then stop_pid "$pid"; log "$d stopped"; fi
  done
  if pid="$(alive "$DIR/munge/munged.pid" munged)"; then stop_pid "$pid"; log "munged stopped"; fi
  log "down (work folder $DIR kept)"
}

status() {
  if ! alive "$DIR/run/slurmctld.pid" slurmctld >/dev/null || ! alive "$DIR/run/slurmd.pid" slurmd >/dev/null; then
    echo "the local cluster is not up (work folder $DIR); start it with: bash scripts/slurm_local.sh up" >&2
    return 1
  fi
  echo "SLURM_CONF=$CONF"
  sinfo
  squeue
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$(printf '%q' "$CONF")" ;;
  *) echo "usage: bash scripts/slurm_local.sh up | down | status | env" >&2; exit 2 ;;
esac
