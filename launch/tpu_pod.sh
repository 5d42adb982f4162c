#!/usr/bin/env bash
# dsset pretraining on a Cloud TPU VM slice (single host or pod): every worker runs the same
# `python -m dsset.main` and JAX joins them (docs/scaling.md). Steps, in order:
#   1. create the slice, or reuse it if it exists     gcloud compute tpus tpu-vm describe / create
#   2. install this project on every worker          git archive HEAD -> scp --worker=all ->
#                                                     ssh --worker=all: untar, pip install -e
#                                                     (skipped with --skip_install)
#   3. start the command on all workers               ssh --worker=all: setsid nohup, log to
#                                                     ~/dsset_run.log on each worker
#   4. stream worker 0's log until training ends      ssh --worker=0: tail --pid; exit with the
#                                                     job's status
#   5. delete the slice if asked                      gcloud compute tpus tpu-vm delete (--delete)
#
# Usage:
#   launch/tpu_pod.sh --name=NAME --zone=ZONE [--project=ID] [--accelerator_type=v4-32]
#       [--runtime_version=tpu-ubuntu2204-base] [--spot] [--skip_install] [--delete] [--dry_run] \
#       -- --config=configs/deepset.py --workdir=/mnt/nfs/run1 [--config.<key>=<value> ...]
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --stop          # stop a running job on all workers
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --delete_only   # delete the slice
#
#   --name, --zone        the TPU VM (required); --project defaults to gcloud's configured project.
#   --accelerator_type    slice to create when it does not exist (default v4-32: 4 hosts).
#   --runtime_version     TPU VM image for a new slice (default tpu-ubuntu2204-base).
#   --spot                create a Spot slice (cheaper, may be preempted; rerun to resume).
#   --skip_install        reuse the code already installed on the workers.
#   --delete              delete the slice after the run ends (also when it fails).
#   --dry_run             print every gcloud command instead of running it.
# Everything after -- goes to dsset.main on every worker, with --config.distributed.enabled=on.
#
# The workdir must be the same shared folder on every worker (e.g. a Filestore NFS or a gcsfuse
# mount at the same path): Orbax writes one checkpoint from all workers and a rerun resumes from it.
# Step 2 ships the committed HEAD of this repository (uncommitted edits are not included). Ctrl-C
# only stops the log stream; the job keeps running on the slice (use --stop).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
name=''
zone=''
project=''
accelerator_type='v4-32'
runtime_version='tpu-ubuntu2204-base'
spot=0
skip_install=0
delete_after=0
delete_only=0
stop=0
dry_run=0
while (($#)); do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator_type=*) accelerator_type="${1#*=}" ;;
    --runtime_version=*) runtime_version="${1#*=}" ;;
    --spot) spot=1 ;;
    --skip_install) skip_install=1 ;;
    --delete) delete_after=1 ;;
    --delete_only) delete_only=1 ;;
    --stop) stop=1 ;;
    --dry_run) dry_run=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    --)
      shift
      break
      ;;
    *)
      echo "tpu_pod.sh: unknown option '$1' (dsset.main's flags go after --)" >&2
      exit 2
      ;;
  esac
  shift
done

if [[ -z $name || -z $zone ]]; then
  echo 'tpu_pod.sh: --name and --zone are required (see --help)' >&2
  exit 2
fi
if ((!delete_only && !stop && $# == 0)); then
  echo 'tpu_pod.sh: give dsset.main arguments after -- (see --help)' >&2
  exit 2
fi

# Flags shared by every `gcloud compute tpus tpu-vm` call.
common=(--zone="$zone")
if [[ -n $project ]]; then
  common+=(--project="$project")
fi

# Runs a command, or with --dry_run prints it (shell-quoted, so it can be pasted).
run() {
  if ((dry_run)); then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

tpu() {
  run gcloud compute tpus tpu-vm "$@"
}

on_workers() {
  local workers="$1" command="$2"
  tpu ssh "$name" "${common[@]}" --worker="$workers" --command="$command"
}

if ((delete_only)); then
  tpu delete "$name" "${common[@]}" --quiet
  exit 0
fi
if ((stop)); then
  # setsid made the job a process group led by the saved pid: end the whole group.
  # shellcheck disable=SC2016  # expanded by the worker's shell
  on_workers all \
    'if [ -f ~/dsset_run.pid ]; then kill -TERM -- "-$(cat ~/dsset_run.pid)" || true; fi'
  exit 0
fi

# 1. Create or reuse.
if ((dry_run)); then
  echo '# 1. reuse the slice if this succeeds, otherwise create it:'
  tpu describe "$name" "${common[@]}" --format='value(state)'
  create_needed=1
elif gcloud compute tpus tpu-vm describe "$name" "${common[@]}" --format='value(state)' \
  >/dev/null 2>&1; then
  echo "tpu_pod.sh: reusing TPU VM $name" >&2
  create_needed=0
else
  create_needed=1
fi
if ((create_needed)); then
  create=(create "$name" "${common[@]}" --accelerator-type="$accelerator_type"
    --version="$runtime_version")
  if ((spot)); then
    create+=(--spot)
  fi
  tpu "${create[@]}"
fi

# Local files for the workers (the code archive, the run script); removed at exit, after which
# the slice is deleted if --delete asked for it, whether the run succeeded or not.
workspace="$(mktemp -d "${TMPDIR:-/tmp}/dsset_tpu.XXXXXX")"
# shellcheck disable=SC2329  # called by the trap below
cleanup() {
  rm -rf "$workspace"
  if ((delete_after)); then
    ((dry_run)) && echo '# 5. delete the slice:'
    tpu delete "$name" "${common[@]}" --quiet
  fi
}
trap cleanup EXIT

# 2. Install the committed project and JAX for TPU on every worker.
if ((!skip_install)); then
  ((dry_run)) && echo '# 2. install the project on every worker:'
  run git -C "$root" archive --format=tar.gz -o "$workspace/dsset.tar.gz" HEAD
  tpu scp "$workspace/dsset.tar.gz" "$name:dsset.tar.gz" "${common[@]}" --worker=all
  on_workers all 'rm -rf ~/dsset && mkdir -p ~/dsset && tar -xzf ~/dsset.tar.gz -C ~/dsset &&'\
' python3 -m pip install --quiet "jax[tpu]" -e ~/dsset'
fi

# 3. Start the same command on all workers, detached so that a dropped ssh session does not end it.
# The script records dsset.main's exit status, which step 4 returns.
{
  echo '#!/bin/bash'
  echo 'cd ~/dsset || exit 1'
  printf 'python3 -m dsset.main'
  printf ' %q' "$@" '--config.distributed.enabled=on'
  printf '\n'
  echo 'echo $? > ~/dsset_run.status'
} >"$workspace/dsset_run.sh"
if ((dry_run)); then
  echo "# 3. start on all workers; $workspace/dsset_run.sh is:"
  sed 's/^/#   /' "$workspace/dsset_run.sh"
fi
tpu scp "$workspace/dsset_run.sh" "$name:dsset_run.sh" "${common[@]}" --worker=all
# shellcheck disable=SC2016  # expanded by the worker's shell
on_workers all 'rm -f ~/dsset_run.status;'\
' setsid nohup bash ~/dsset_run.sh </dev/null >~/dsset_run.log 2>&1 & echo $! >~/dsset_run.pid'

# 4. Follow worker 0 (process 0 writes the metrics) until its job ends; return its exit status.
((dry_run)) && echo "# 4. stream worker 0's log:"
# shellcheck disable=SC2016  # expanded by the worker's shell
on_workers 0 'tail -n +1 -F --pid="$(cat ~/dsset_run.pid)" ~/dsset_run.log;'\
' exit "$(cat ~/dsset_run.status 2>/dev/null || echo 1)"'
