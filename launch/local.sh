#!/usr/bin/env bash
# Runs one dsset training as N processes on this machine, joined through jax.distributed on the CPU
# backend. This exercises the multi-host code path (coordinator, per-process data blocks, Orbax's
# coordinated checkpoints, logging from process 0) without a cluster; it proves correctness, not
# speed (all processes share this machine's cores).
#
# Usage:
#   launch/local.sh [--num_processes=N] [--devices_per_process=D] [--log_dir=DIR] \
#       -- --config=configs/deepset.py --workdir=/tmp/run [--config.<key>=<value> ...]
#
#   --num_processes=N        processes to start (default 2).
#   --devices_per_process=D  fake CPU devices per process (XLA's host device count); default: leave
#                            XLA_FLAGS as it is (1 device per process unless it says otherwise).
#   --log_dir=DIR            where processes 1..N-1 write process_<i>.log (default: a new
#                            temporary folder, printed at the start). Process 0's output goes to
#                            this terminal.
#   Everything after -- goes to `python -m dsset.main` in every process.
#
# Each process gets DSSET_COORDINATOR_ADDRESS=127.0.0.1:<free port>, DSSET_NUM_PROCESSES=N and
# DSSET_PROCESS_ID=i, which dsset.parallel.initialize_distributed reads (distributed.enabled=auto).
# JAX_PLATFORMS defaults to cpu. Ctrl-C or SIGTERM stops every process; if one process fails the
# others are stopped too (they would otherwise wait in a collective), and the script exits with the
# first failure's status. PYTHON selects the interpreter (default python3).
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

num_processes=2
devices_per_process=''
log_dir=''
while (($#)); do
  case "$1" in
    --num_processes=*) num_processes="${1#*=}" ;;
    --devices_per_process=*) devices_per_process="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      break
      ;;
    *)
      echo "local.sh: unknown option '$1' (dsset.main's flags go after --)" >&2
      exit 2
      ;;
  esac
  shift
done

if ! [[ $num_processes =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: --num_processes must be a positive integer, got '$num_processes'" >&2
  exit 2
fi
if [[ -n $devices_per_process && ! $devices_per_process =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: --devices_per_process must be a positive integer, got '$devices_per_process'" >&2
  exit 2
fi
if (($# == 0)); then
  echo 'local.sh: no dsset.main arguments after --' \
    '(e.g. -- --config=configs/deepset.py --workdir=DIR)' >&2
  exit 2
fi

python="${PYTHON:-python3}"
# Port 0 makes the kernel pick a free port; it is released at once for the coordinator to bind.
port="$("$python" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')"
if [[ -z $log_dir ]]; then
  log_dir="$(mktemp -d "${TMPDIR:-/tmp}/dsset_local.XXXXXX")"
fi
mkdir -p "$log_dir"

export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export DSSET_COORDINATOR_ADDRESS="127.0.0.1:$port"
export DSSET_NUM_PROCESSES="$num_processes"
if [[ -n $devices_per_process ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices_per_process"
fi

echo "local.sh: $num_processes processes, coordinator $DSSET_COORDINATOR_ADDRESS," \
  "logs of processes other than 0 in $log_dir" >&2

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    if [[ -n $pid ]]; then
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
}

interrupted=0
# shellcheck disable=SC2329  # called by the trap below
on_signal() {
  interrupted=1
  echo 'local.sh: stopping all processes' >&2
  stop_all
}
# Background jobs of a non-interactive shell ignore SIGINT, so every signal is passed on as SIGTERM.
trap on_signal INT TERM

for ((i = 0; i < num_processes; i++)); do
  if ((i == 0)); then
    DSSET_PROCESS_ID=0 "$python" -m dsset.main "$@" &
  else
    DSSET_PROCESS_ID="$i" "$python" -m dsset.main "$@" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done

# Polled rather than `wait -n` so that a signal arriving mid-wait cannot be mistaken for an exit.
status=0
while :; do
  running=0
  for i in "${!pids[@]}"; do
    pid="${pids[i]}"
    [[ -z $pid ]] && continue
    if kill -0 "$pid" 2>/dev/null; then
      running=1
      continue
    fi
    code=0
    wait "$pid" || code=$?
    pids[i]=''
    if ((code != 0 && status == 0)); then
      status=$code
      if ((interrupted == 0)); then
        where='above'
        if ((i > 0)); then where="in $log_dir/process_$i.log"; fi
        echo "local.sh: process $i failed with status $code (its output is $where);" \
          'stopping the others' >&2
        stop_all
      fi
    fi
  done
  ((running)) || break
  sleep 0.5
done

if ((interrupted && status == 0)); then
  status=130
fi
exit "$status"
